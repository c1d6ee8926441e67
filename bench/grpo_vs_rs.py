"""GRPO vs rejection sampling at an equal number of generated samples (issue 13), on the tiny arithmetic policy, CPU.

    .venv/bin/python bench/grpo_vs_rs.py --out runs/grpo-vs-rs        # ≈ 6–8 min on the 2-core box

The start policy is the test suite's shared SFT model (tests/sft_task.py: 2-layer d128 model, 300 full SFT steps on
one-digit sums; trained here first, ≈ 1 min). From it, on the same RS prompts (one-digit sums, seed 5) and the same
held-out problems (``--heldout``, seed 6), through the same reference-engine rollout actor:

  rs    one round of jobs/rs_rounds.py: K = 8 candidates for each of ``--prompts`` prompts (T 0.8), the numeric
        verifier keeps the best correct one, SFT from the policy on the accepted rows (200 steps of 16, lr 2e-3, as
        rs-rounds-tiny) — ``prompts × 8`` samples;
  grpo  jobs/grpo.py with the grpo-tiny settings (8 prompts × G 8 per step, T 1.0, lr 5e-5, on-policy) for
        ``prompts × 8 / 64`` steps — the same number of samples;
  grpo-overlap  the same with ``grpo.overlap=true``: each batch sampled while the previous one trains (off-policy
        by one step).

GRPO arms also report, per step (medians over the steps after the first): the step's wall time (differences of
metrics.csv's time), rollout_s (sampling + scoring a batch) and rollout_wait_s (how long training waited for it) — the
overlap shows as wait < rollout and a shorter step.

RS runs once (rs-rounds has no seed setting: its sampling is seeded by the job); GRPO runs ``--seeds`` times
(``grpo.seed``: prompt order and sampling). The line per arm has greedy held-out accuracy before and after (median
over the runs) and the seconds taken. One JSON line per arm on stdout and in
``--out``/grpo_vs_rs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def step_times(run_dir: Path) -> dict[str, float]:
    """Medians over the steps after the first: step wall time, rollout_s, rollout_wait_s (metrics.csv)."""
    import csv

    with (run_dir / "metrics" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    walls = [float(b["time"]) - float(a["time"]) for a, b in zip(rows, rows[1:])]
    med = lambda key: round(statistics.median(float(r[key]) for r in rows[1:]), 3)  # noqa: E731
    return {"step_s": round(statistics.median(walls), 3), "rollout_s": med("rollout_s"),
            "rollout_wait_s": med("rollout_wait_s")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256, help="RS prompts (samples = prompts × 8 in both arms)")
    ap.add_argument("--heldout", type=int, default=256, help="held-out problems")
    ap.add_argument("--seeds", type=int, default=2, help="runs per arm")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="grpo_vs_rs.jsonl goes here")
    ap.add_argument("--arms", default="rs,grpo,grpo-overlap", help="comma-separated: rs, grpo, grpo-overlap")
    a = ap.parse_args(argv)

    from core.config import load_config
    from jobs.grpo import GrpoConfig, grpo
    from jobs.rs_rounds import RoundsConfig
    from jobs.rs_rounds import run as rounds
    from sft_task import make_task, train_full
    from tasks.arithmetic import problems, sft_row

    work = a.work or Path(tempfile.mkdtemp(prefix="grpo-vs-rs-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    task = make_task(work / "task")
    _, base = train_full(task, work / "base")
    prompts = write(work / "prompts.jsonl", [p.to_dict() for p in problems(a.prompts, seed=5, digits=1, ops="+",
                                                                           prefix="rs")])
    heldout = write(work / "heldout.jsonl", [p.to_dict() for p in problems(a.heldout, seed=6, digits=1, ops="+",
                                                                           prefix="held")])
    replay = write(work / "replay.jsonl", [sft_row(p) for p in problems(1000, seed=1, digits=1, ops="+")])
    samples = a.prompts * 8
    machine = {"cpu": platform.machine(), "node": platform.node(), "base_s": round(time.time() - t0, 1)}
    arms: dict[str, list[dict]] = {arm: [] for arm in a.arms.split(",")}
    unknown = set(arms) - {"rs", "grpo", "grpo-overlap"}
    if unknown:
        ap.error(f"unknown arms {sorted(unknown)}")
    if "rs" in arms:
        t = time.time()
        state = rounds(load_config(RoundsConfig, "rs-rounds-tiny", [
            f"policy={base['export']}", f"prompts={prompts}", f"heldout={heldout}", "rounds=1", f"out={work / 'rs'}",
            "pool.engine=reference", "pool.batch_size=64", f"replay={replay}", f"heldout_size={a.heldout}",
            "sft.eval.metric=none", "sft.run.progress=false"]))
        arms["rs"].append({"before": state["baseline_accuracy"], "after": state["rounds"][0]["accuracy"],
                           "accepted": state["rounds"][0]["sft_rows"], "s": round(time.time() - t, 1)})
    for arm in [x for x in arms if x.startswith("grpo")]:
        for seed in range(a.seeds):
            t = time.time()
            name = f"{arm}-{seed}"
            out = grpo(load_config(GrpoConfig, "grpo-tiny", [
                f"policy={base['export']}", f"prompts={prompts}", f"heldout={heldout}", f"heldout_size={a.heldout}",
                f"run.storage={work}", f"run.name={name}", "run.progress=false", "pool.engine=reference",
                f"train.max_steps={samples // 64}", f"grpo.seed={seed}", f"grpo.overlap={arm == 'grpo-overlap'}"]))
            arms[arm].append({**out["heldout"], "s": round(time.time() - t, 1), **step_times(work / name)})
    for arm, runs in arms.items():
        line = {"bench": "grpo_vs_rs", "machine": machine, "arm": arm, "samples": samples, "heldout": a.heldout,
                "before": runs[0]["before"], "after_median": statistics.median(r["after"] for r in runs),
                "runs": runs}
        print(json.dumps(line), flush=True)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            with (a.out / "grpo_vs_rs.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
