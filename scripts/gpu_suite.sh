#!/usr/bin/env bash
# The whole GPU data-plane suite (issue 5) on a fresh GPU machine, in one command:
#   scripts/gpu_suite.sh [pdpush bench-gpu flags, e.g. --p-gpu 0 --d-gpu 1]
# Needs the carried wheels in .whl/ (nixl-cu13 and nixl for cp312, pyroute2); writes
# results.json, report.md, interference.png, suite.log, env.txt and the rdma-stat output to
# $OUT (default out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}
mkdir -p "$out"
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
python3 -m pdpush.cli bench-gpu --out "$out" "$@" 2>&1 | grep -v "NIXL INFO" | tee "$out/suite.log"
rc=${PIPESTATUS[0]}
if [ -f src/pdpush/rdma/cli.py ]; then
  # the RDMA counter reader against a real kernel with RDMA netlink and no RDMA device
  python3 -m pdpush.cli rdma-stat --source netlink --json > "$out/rdma_stat.txt" 2>&1
  echo "rdma-stat exit code: $?" >> "$out/rdma_stat.txt"
fi
exit "$rc"
