#!/usr/bin/env bash
# The whole GPU data-plane suite (`pdpush bench gpu`) on a fresh GPU machine, in one command:
#   scripts/gpu_suite.sh [pdpush bench gpu flags, e.g. --p-gpu 0 --d-gpu 1]
# Needs the carried wheels in .whl/ (nixl-cu13 and nixl for cp312, pyroute2); writes
# results.json, report.md, interference.png, suite.log, env.txt, variants.md (+ .tgz) and the
# rdma-stat output to $OUT (default out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}
mkdir -p "$out" /tmp/sweep
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "gpu_suite: installing .whl/ failed" >&2; exit 1; }
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
{
  date -u
  echo "command: scripts/gpu_suite.sh $*"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'
  uname -r
} > "$out/env.txt" 2>&1
python3 -m pdpush.cli bench gpu --out "$out" "$@" 2>&1 | grep -v "NIXL INFO" | tee "$out/suite.log"
rc=${PIPESTATUS[0]}
# What made the difference: the bandwidth and pipeline phases again under each posting setting
# (layer batching, NIXL UCX thread pool and its split batch, transfer threads); SWEEP=0 skips it.
if [ "${SWEEP:-1}" = 1 ]; then
  : > "$out/variants.md"
  for v in "plain:--no-batch" \
           "batch:" \
           "ucx4-b8-nobatch:--ucx-threads 4 --ucx-param split_batch_size=8 --no-batch" \
           "ucx4-b8:--ucx-threads 4 --ucx-param split_batch_size=8" \
           "ucx4-b4:--ucx-threads 4 --ucx-param split_batch_size=4" \
           "ucx8-b8:--ucx-threads 8 --ucx-param split_batch_size=8" \
           "ucx4-b8-post2:--ucx-threads 4 --ucx-param split_batch_size=8 --post-threads 2"; do
    name=${v%%:*}
    # shellcheck disable=SC2086  # the flags are meant to split
    python3 -m pdpush.cli -q bench gpu --out "/tmp/sweep/$name" --phases bandwidth,pipeline \
      ${v#*:} > "/tmp/sweep/$name.log" 2>&1
    echo "## variant $name (${v#*:}) exit $?" >> "$out/variants.md"
    cat "/tmp/sweep/$name/report.md" >> "$out/variants.md" 2>/dev/null
  done
  tar czf "$out/variants.tgz" -C /tmp sweep
fi
if [ -f src/pdpush/rdma/cli.py ]; then
  # the RDMA counter reader against a real kernel with RDMA netlink and no RDMA device
  python3 -m pdpush.cli rdma-stat --source netlink --json > "$out/rdma_stat.txt" 2>&1
  echo "rdma-stat exit code: $?" >> "$out/rdma_stat.txt"
fi
exit "$rc"
