#!/usr/bin/env bash
# Rejoin the parts made by bench/device/stage_vllm.sh and install vLLM into a target directory (run THERE, on the
# GPU machine, in the project root; no network needed).
#
#   bash bench/device/restore_vllm.sh [PARTS_DIR]     # default /tmp/vparts (parts collected by earlier calls)
#   export PYTHONPATH=/tmp/vsite:/tmp/site:$PYTHONPATH   # what it prints at the end: vLLM first, then Ray
#
# The parts arrive one per device call (each call may carry ≤ 64 MiB, and files outside the repo survive only while
# the machine stays warm), each call copying its part into PARTS_DIR:
#   carry [".device/vllm/part-03", ".device/vllm/SHA256SUMS"], command
#   mkdir -p /tmp/vparts && cp .device/vllm/part-03 /tmp/vparts/
# This script checks every part against SHA256SUMS, rejoins them (one tar cut by `split`), installs the wheels with
# `pip install --no-index --no-deps --target`, then checks that every requirement of vllm (transitively, extras
# left out) is met by what Python will import with /tmp/vsite first on the path, and prints the PYTHONPATH to use.
set -euo pipefail
parts="${1:-/tmp/vparts}"
site="${VSITE:-/tmp/vsite}"
sums="${SUMS:-$PWD/.device/vllm/SHA256SUMS}"
t0=$(date +%s%N)
if [ -f "$sums" ]; then
  (cd "$parts" && sha256sum --quiet -c "$sums") || { echo "restore_vllm: a part is missing or damaged" >&2; exit 2; }
else
  echo "restore_vllm: no $sums; parts not verified" >&2
fi
whl=$(mktemp -d /tmp/vwhl.XXXX)
cat "$parts"/part-* | tar xf - -C "$whl"
echo "restore_vllm: $(ls "$whl" | wc -l) wheels, $(du -sm "$whl" | cut -f1) MiB"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl \
  2>&1 | grep -v -e 'already exists' -e '^WARNING: Target directory' || true
rm -rf "$whl"
LEFT_OUT="$(cat "$(dirname "$sums")/left_out.txt" 2>/dev/null || true)" PYTHONPATH="$site:${PYTHONPATH:-}" python3 - <<'EOF'
# Every requirement of vllm, followed transitively, against what this path imports (first on sys.path wins).
import importlib.metadata as md
import os
import re
from packaging.requirements import Requirement
def cn(n): return re.sub(r"[-_.]+", "-", n).lower()
left_out = {cn(x) for x in os.environ.get("LEFT_OUT", "").split()}  # by stage_vllm.sh, on purpose
seen, bad, todo = set(), [], ["vllm"]
while todo:
    name = todo.pop()
    if cn(name) in seen or cn(name) in left_out:
        continue
    seen.add(cn(name))
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        bad.append(f"{name}: not installed")
        continue
    for rd in dist.requires or []:
        q = Requirement(rd)
        if q.marker and not q.marker.evaluate({"extra": ""}):
            continue
        if cn(q.name) in left_out:
            continue
        try:
            have = md.version(q.name)
        except md.PackageNotFoundError:
            bad.append(f"{q.name} (for {name}): missing")
            continue
        if q.specifier and not q.specifier.contains(have, prereleases=True):
            bad.append(f"{q.name} {have} (for {name}) does not satisfy {q.specifier}")
        todo.append(q.name)
print(f"restore_vllm: {len(seen)} distributions checked; vllm {md.version('vllm')}, torch {md.version('torch')}, "
      f"numpy {md.version('numpy')}, numba {md.version('numba')}")
for b in bad:
    print("restore_vllm: UNMET", b)
EOF
echo "restore_vllm: done in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
echo "export PYTHONPATH=$site:/tmp/site:\$PYTHONPATH"
