#!/usr/bin/env bash
# P's sender memory-ordering rule on vLLM engines (issue 14), on one CUDA GPU:
#   source /tmp/stack/env.sh; PYTHONPATH=$PWD/src bash scripts/gpu_ordering.sh OUT [--trials N] [--delay-us US]
# Starts P-skip (event wait off + GPU delay), P-wait (delay only) and D (debug_kv_compare) one
# after the other, runs N trials per P (remote prefill vs D's own, KV compared block by block on
# D) and writes OUT/results.json, OUT/results.md, OUT/env.txt, OUT/run.log, OUT/logs/.
# What it proves and how: tests/gpu/ordering_run.py and docs/architecture.md "Memory ordering".
# Three engine starts of 60-110 s each plus 1-2 min of trials: 4-7 minutes. Needs D's /kv_digest
# (connector/kv_digest.py). PDPUSH_GPU_DRY_RUN=1 runs the flow on vLLM CPU engines instead.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_ordering.sh OUT [--trials N] [--delay-us US] [--budget-s S]}
shift
mkdir -p "$out"
# The GPU stack (vLLM 0.26 + NIXL) prepends its paths; the tree's src goes first either way.
[ -f /tmp/stack/env.sh ] && source /tmp/stack/env.sh
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u
  echo "command: scripts/gpu_ordering.sh $out $*"
  git log -1 --oneline 2>/dev/null
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>&1
  python3 -c 'import sys, torch, vllm; print(sys.version.split()[0], "torch", torch.__version__, "vllm", vllm.__version__)'
} > "$out/env.txt" 2>&1
python3 tests/gpu/ordering_run.py "$out" "$@" 2>&1 | grep -v "NIXL INFO" | tee "$out/run.log"
exit "${PIPESTATUS[0]}"
