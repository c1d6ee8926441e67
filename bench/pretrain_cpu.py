"""Pretraining tokens/s of the ``tiny`` preset on CPU: 1 and 2 Ray Train workers next to the same loop without Ray.

Runbook::

    python bench/pretrain_cpu.py                 # ~3 min on 2 cores; prints one JSON line
    python bench/pretrain_cpu.py --steps 40 --seq 256

Same loop as the GPU bench (training/loop.run_worker via bench/pretrain_mfu.py): FSDP2 over gloo, fp32, no
compile, synthetic tokens, no checkpoints; medians over the steps after ``--warmup``. Without Ray = torchrun with
the same number of processes. On a shared 2-core machine the absolute figures move with the load: compare the
columns of one run only.

Measured 2026-11-26 02:01 UTC on the dev box (AMD EPYC, 2 cores, quiet: 1-min load 0.02 at start; seq 128,
micro 8 per worker, 15 measured steps each):

| run                    | tokens/s | per worker | overhead of Ray |
|------------------------|---------:|-----------:|----------------:|
| Ray Train, 1 worker    |    2 665 |      2 665 |          4.2 %  |
| torchrun, 1 process    |    2 782 |      2 782 |                 |
| Ray Train, 2 workers   |    4 341 |      2 171 |          8.4 %  |
| torchrun, 2 processes  |    4 737 |      2 368 |                 |

Two workers on two cores give 1.63× (Ray) / 1.70× (torchrun): the gloo all-gathers and the Ray processes (raylet,
GCS, the train controller) share the same two cores, which is where the extra 4 points of Ray overhead go at 2 workers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrain_mfu  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    o = ap.parse_args()
    argv = ["--preset", "tiny", "--seq", str(o.seq), "--micro", str(o.micro), "--steps", str(o.steps),
            "--warmup", str(o.warmup), "--no-compile", "--loss", "plain"]
    a = pretrain_mfu.parse_args(argv)
    out: dict = {"bench": "pretrain_cpu", "preset": "tiny", "seq": o.seq, "micro_batch_per_worker": o.micro}
    for world in (1, 2):
        out[f"ray_{world}w"] = pretrain_mfu.run_ray(a, world)
        out[f"no_ray_{world}w"] = pretrain_mfu.run_torchrun(a, world, argv)
        r, t = out[f"ray_{world}w"], out[f"no_ray_{world}w"]
        if "tokens_per_s" in r and "tokens_per_s" in t:
            out[f"ray_overhead_{world}w"] = round(1 - r["tokens_per_s"] / t["tokens_per_s"], 4)
    for k in list(out):
        if isinstance(out[k], dict):
            out[k] = {x.replace("gpus", "workers").replace("per_gpu", "per_worker"): y
                      for x, y in out[k].items() if x not in ("mfu", "mfu_head_excluded")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
