#!/usr/bin/env bash
# Issue 11 items 3, 4 and 6 on one GPU with a Qwen2-7B-shaped model (28 layers, 4 KV heads of
# 128, bf16, vLLM's dummy weights, a byte-level tokenizer made here):
#   source /tmp/stack/env.sh; PYTHONPATH=$PWD/src bash scripts/gpu_serving.sh OUT [--part PARTS]
# PARTS is a comma list, each part under ~8 minutes (one device command each):
#   ttft          where TTFT goes: pdpush remote vs local prefill on an idle D, 2000 and 8000
#                 tokens (P and D started one after the other, vLLM's memory profiling)
#   serving       vllm bench serve at 3 QPS points per path: pdpush 1P1D, aggregated vLLM, vLLM
#                 NixlConnector 1P1D behind its proxy flow; the 5 servers start at once with a
#                 fixed KV cache each (--kv-cache-gib)
#   interference  the decode-interference protocol (64 background requests, 2000-token load at
#                 QPS 0-3, DecodeLatency over contexts 1500-2000)
#   all           the three, one after the other (~20 minutes)
# Writes at most 8 files to OUT: env.txt, report.md, <part>.json per part, serving-*.png,
# latency_vs_context.png, logs.tgz (every server log and each command's output).
# Knobs (environment): QPS (default 2,5,8), LENGTHS (2000/200), DURATION_S (25), PATHS
# (pdpush,local,nixl-pull), KV_GIB (6), REPEATS (10), BREAKDOWN (2000,8000), MAX_LEN (8448),
# MODEL_DIR (/tmp/pdpush-qwen2-7b-shape), INTERFERENCE (its extra flags).
# Dry run on a CPU: DEVICE=cpu SHAPE=tiny plus small sizes (see docs/architecture.md, "Where TTFT
# goes"): the same commands with the tiny built-in model.
set -uo pipefail
out=${1:?usage: scripts/gpu_serving.sh OUT [--part ttft|serving|interference|all]}
shift
parts=ttft
while [ $# -gt 0 ]; do
  case $1 in
    --part) parts=${2:?--part needs a value}; shift 2 ;;
    --part=*) parts=${1#--part=}; shift ;;
    *) echo "gpu_serving.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$parts" = all ] && parts=ttft,serving,interference
out=$(realpath -m "$out")
cd "$(dirname "$0")/.."
# pdpush from this tree; the GPU stack's packages (vLLM 0.26, NIXL) whether or not the caller's
# PYTHONPATH still has them (`PYTHONPATH=... bash` replaces what env.sh exported).
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# shellcheck disable=SC1091
[ -f /tmp/stack/env.sh ] && source /tmp/stack/env.sh
mkdir -p "$out"
work=$(mktemp -d /tmp/pdpush-gpu-serving.XXXX)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
if [ "${SHAPE:-7b}" = tiny ]; then
  make_model="from pdpush.local.tinymodel import ensure_tiny_model; print(ensure_tiny_model())"
  engine=""
else
  make_model="from pdpush.local.tinymodel import ensure_tiny_model, QWEN2_7B_SHAPE as S; \
print(ensure_tiny_model('${MODEL_DIR:-/tmp/pdpush-qwen2-7b-shape}', S, weights=False))"
  engine="--dtype bfloat16 --load-format dummy"
fi
{
  date -u
  echo "command: scripts/gpu_serving.sh $out --part $parts"
  git log -1 --oneline 2>/dev/null
  nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv
  $py -c 'import sys, torch, vllm; print(sys.version.split()[0], "torch", torch.__version__, "vllm", vllm.__version__)'
} > "$out/env.txt" 2>&1
model=$($py -c "$make_model" 2>> "$out/env.txt" | tail -1)
[ -f "$model/config.json" ] || { echo "gpu_serving.sh: could not make the model folder" >&2; exit 1; }
echo "model: $model (${SHAPE:-7b}), engine args: $engine" >> "$out/env.txt"
maxlen=${MAX_LEN:-8448}
: > "$out/report.md"
rc=0

# run PART SECONDS CMD...: one pdpush command under a time limit (SIGINT: its servers are
# stopped), its output kept for logs.tgz, its report appended to report.md.
run() {
  local part=$1 limit=$2
  shift 2
  echo "== $part: $*" | tee -a "$work/commands.log"
  local t0=$SECONDS
  timeout -s INT -k 30 "$limit" "$py" -m pdpush.cli "$@" > "$work/$part.out" 2>&1
  local code=$?
  echo "== $part: exit $code after $((SECONDS - t0)) s" | tee -a "$work/commands.log"
  tail -5 "$work/$part.out"
  [ $code -ne 0 ] && rc=$code
  { echo "# $part (exit $code, $((SECONDS - t0)) s)"; cat "$work/$part/report.md" 2>/dev/null; echo; } >> "$out/report.md"
  cp "$work/$part/report.json" "$out/$part.json" 2>/dev/null
  cp "$work/$part"/*.png "$out/" 2>/dev/null
  return 0
}

for part in ${parts//,/ }; do
  case $part in
    ttft)
      run ttft 500 bench serving --paths pdpush --breakdown "${BREAKDOWN:-2000,8000}" \
        --repeats "${REPEATS:-10}" --device "$device" --gpu-share 0.4 --max-model-len "$maxlen" \
        --model "$model" --engine-args "$engine --max-num-seqs 64" --out "$work/ttft" ;;
    serving)
      run serving 540 bench serving --paths "${PATHS:-pdpush,local,nixl-pull}" \
        --qps "${QPS:-2,5,8}" --lengths "${LENGTHS:-2000/200}" --duration-s "${DURATION_S:-25}" \
        --slo-ttft-ms 2000 --slo-tpot-ms 50 --parallel-start --kv-cache-gib "${KV_GIB:-6}" \
        --device "$device" --gpu-share 0.12 --max-model-len "$maxlen" --model "$model" \
        --engine-args "$engine --max-num-seqs 64" --out "$work/serving" ;;
    interference)
      # shellcheck disable=SC2086  # INTERFERENCE holds flags
      run interference 520 bench interference --qps 0,1,2,3 --repeat-baseline 1 --batch 64 \
        --max-tokens 2000 --device "$device" --gpu-share 0.4 --model "$model" \
        --engine-args "$engine" ${INTERFERENCE:-} --out "$work/interference"
      rm -f "$out/rx_over_time.png" ;;
    *) echo "gpu_serving.sh: unknown part $part (ttft, serving, interference, all)" >&2; rc=2 ;;
  esac
done
tar czf "$out/logs.tgz" -C "$work" --exclude='*.png' --exclude='report.*' . 2>/dev/null
rm -rf "$work"
ls -la "$out"
exit "$rc"
