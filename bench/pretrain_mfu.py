"""Pretraining throughput / MFU of the ``llama-1b`` preset on GPUs: Ray Train vs plain torchrun, and GPU scaling.

Runbook (GPU machine, Ray staged as in /work/shared/DESIGN.md)::

    python bench/pretrain_mfu.py --gpus 1              # Ray Train 1 GPU + torchrun 1 GPU (Ray overhead)
    python bench/pretrain_mfu.py --gpus 2 --modes ray  # + 1 GPU in the same call → 2-GPU scaling

Both paths run the SAME loop (training/loop.run_worker): FSDP2 per block + root, bf16 params / fp32 reduce,
torch.compile per block, fused AdamW, no activation checkpointing, micro batch 8 × 2048 per GPU, synthetic tokens
(data loading is not the subject), no checkpoints. Figures are medians over the steps after ``--warmup``.
MFU = tokens/s × ModelArgs.flops_per_token(seq) / (device peak × GPUs; training/flops.py, 989e12 on H100/H200), N
counting every matmul, the tied output head included (issue 14's convention, ModelArgs.matmul_params). The figure of
the older formula, which left a tied head out of N, is printed beside it as ``mfu_head_excluded``. Prints one JSON
line. The tables below were measured before the convention changed: their "MFU with head" column is today's
``mfu``, their "MFU" column today's ``mfu_head_excluded``.

Measured 2026-11-25 (torch 2.11+cu130, H100 80GB HBM3, llama-1b = 1.24 B params with the 128k tied embedding,
seq 2048, micro 8/GPU, medians of steps 11-30):

| run                                  | tokens/s | per GPU | MFU   | MFU with head | peak mem |
|--------------------------------------|---------:|--------:|------:|--------------:|---------:|
| Ray Train, 1 GPU, plain loss         |   57 254 |  57 254 | 38.5% | 47.6%         | 62.5 GB  |
| torchrun, 1 GPU, plain loss          |   57 262 |  57 262 | 38.5% | 47.6%         | 62.5 GB  |
| Ray Train, 1 GPU, fused loss         |   61 606 |  61 606 | 41.4% | 51.2%         | 42.1 GB  |
| Ray Train, 2 GPUs, fused loss        |  120 156 |  60 078 | 40.4% | 49.9%         | 34.6 GB  |
| torchrun, 2 GPUs, fused loss         |  121 795 |  60 898 | 40.9% | 50.6%         | 34.6 GB  |
| Ray Train, 1 GPU, fused, micro 12    |   64 789 |  64 789 | 43.5% | 53.9%         | 55.1 GB  |
| Ray Train, 1 GPU, fused, micro 16    |   66 792 |  66 792 | 44.9% | 55.5%         | 68.0 GB  |
| + SDPA enable_gqa (no K/V copies)    |   67 258 |  67 258 | 45.2% | 55.9%         | 64.8 GB  |
| torchrun, same                       |   66 968 |  66 968 | 45.0% | 55.7%         | 64.8 GB  |

Ray overhead: 0.01 % (1 GPU), 1.35 % (2 GPUs). 2-GPU scaling 1.95× (micro 8). The ≥ 55 % MFU target is NOT met
by the prescribed formula: best 44.9 % (micro 16; 55.5 % counting the 128k-vocabulary head, which this preset's tied
embedding hides from N). Rows 1-2 ran on one nvidia-h100-x1 machine, rows 3-5 (and a torchrun plain-loss 1-GPU
control: 56 158 tokens/s, so the machines agree within 2 %) on one nvidia-h100-x2 host, rows 6-7 on another
nvidia-h100-x1 (steps 9-25). Measured with ``--micro 16 --steps 25 --warmup 8`` for the last four; the last two
ran together on one more nvidia-h100-x1 (Ray overhead there: -0.4 %, i.e. noise).
Rerun 2026-11-26 after pretrain/SFT/DPO were merged into one loop (then jobs/train_loop.Objective), Ray Train, 1 H100,
micro 16, steps 9-20: 65 957 tokens/s, 44.3 % MFU (54.8 % with head), 64.8 GB — within 2 % of the row above.

Rerun 2026-11-26 (third session), one nvidia-h100-x1 machine, micro 16, steps 9-22: Ray Train 66 138 tokens/s, 44.4 %
(55.0 % with head), torchrun 66 522 (44.7 %), Ray overhead 0.58 %; bench/mfu_ceiling.py on the same machine: the
step's GEMMs + attention alone take 399.6 ms = 82.0 k tokens/s = 55.1 % (56.1 % on a third machine) — the ceiling with
every other kernel free. bench/README.md has the table and the profile (--profile) of where the other ~95 ms go. Two
GPUs (the tool lent two H200s): Ray 2 GPUs 132 954 vs 1 GPU 68 842 tokens/s = 1.93×, Ray overhead at 2 GPUs 0.36 %.

Why 55 % is out of reach for this preset by the prescribed formula: N leaves out the 262 M-parameter embedding, and
because llama-1b ties it to the output head, that also drops the head's matmul (6·V·d = 1.58 GFLOP per token, 24 %
of the counted 6.64) although the GPU executes it. 55 % by the formula needs 81.9 k tokens/s, i.e. 68 % of the H100's
peak actually spent; the DESIGN.md reference model (0.89 B, 51.6 %) had no such hidden head. Counting the head, the
same runs are at 55-56 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import contextlib  # noqa: E402
import socket  # noqa: E402
from typing import Any, Iterator  # noqa: E402

from model.llama import ModelArgs  # noqa: E402
from training.flops import peak_flops  # noqa: E402
from training.loop import LoopSpec, TrainConfig  # noqa: E402
from training.objectives.pretrain import PretrainObjective, causal_lm_loss, fused_lm_loss  # noqa: E402


class SyntheticRows:
    """Uniform random tokens (data loading is not what this bench measures); row i is the same everywhere."""

    def __init__(self, num_rows: int, seq_len: int, vocab_size: int) -> None:
        self.num_rows, self.seq_len, self.vocab_size = num_rows, seq_len, vocab_size

    def batch(self, indices, device):
        import torch

        g = torch.Generator().manual_seed(int(indices[0]))
        return torch.randint(0, self.vocab_size, (len(indices), self.seq_len + 1), generator=g).to(device)


class LocalSession:
    """training/loop.Session under torchrun without Ray: no checkpoint store; reports are dropped."""

    def device(self):
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    @contextlib.contextmanager
    def restore(self) -> Iterator[None]:
        yield None

    def report(self, metrics: dict[str, Any], ckpt_dir: Any) -> None:
        pass

    def settle(self) -> None:
        pass

    def node_id(self) -> str:
        return socket.gethostname()


def device_peak() -> float | None:
    """This machine's GPU's dense BF16 peak (training/flops.py); None without a GPU or for an unknown one."""
    import torch

    return peak_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def make_spec(a: argparse.Namespace, world: int, metrics_dir: str) -> LoopSpec:
    args = ModelArgs.from_name(a.preset, max_seq_len=max(a.seq, 2048))
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.micro * world, micro_batch_size=a.micro, lr=3e-4,
                      warmup_steps=2, compile=not a.no_compile, activation_checkpointing=a.ac, eval_sequences=0)
    seq, vocab = a.seq, args.vocab_size
    return LoopSpec(model_args=args, train=cfg,
                    make_train_source=lambda: SyntheticRows(10**9, seq, vocab), metrics_dir=metrics_dir,
                    objective=PretrainObjective(fused_lm_loss if a.loss == "fused" else causal_lm_loss),
                    ckpt_at_end=False, write_report=False)


def summarise(metrics_dir: str, a: argparse.Namespace, world: int, wall: float) -> dict:
    from training.metrics import read_csv

    rows = read_csv(Path(metrics_dir) / "metrics.csv")[a.warmup:]
    if not rows:
        return {"error": f"no metrics rows in {metrics_dir}"}
    tps = statistics.median(float(r["tokens_per_s"]) for r in rows)
    args = ModelArgs.from_name(a.preset)
    head = 6 * args.dim * args.vocab_size if args.tie_embeddings else 0
    peak = device_peak()
    return {"gpus": world, "tokens_per_s": round(tps), "tokens_per_s_per_gpu": round(tps / world),
            "mfu": round(tps * args.flops_per_token(a.seq) / (peak * world), 4) if peak else None,
            "mfu_head_excluded": round(tps * (args.flops_per_token(a.seq) - head) / (peak * world), 4) if peak
            else None,
            "peak_mem_gb": round(max(float(r["peak_mem_gb"]) for r in rows), 1),
            "final_loss": round(float(rows[-1]["loss"]), 3), "steps_measured": len(rows), "wall_s": round(wall, 1)}


def run_ray(a: argparse.Namespace, world: int, cpus_per_worker: float = 1.0) -> dict:
    """The loop on ``world`` Ray Train workers; on CPU each holds ``cpus_per_worker`` CPUs (Ray sets its
    OMP_NUM_THREADS, so its torch threads, to that)."""
    import ray
    import torch
    import ray.train
    from ray.train.torch import TorchTrainer

    from cluster.connect import connect
    from jobs.trainer import RaySession
    from training.loop import run_worker

    connect()
    d = tempfile.mkdtemp(prefix=f"mfu-ray{world}-")
    spec = make_spec(a, world, d)

    def fn(config):
        run_worker(config["spec"], RaySession())

    t0 = time.time()
    trainer = TorchTrainer(fn, train_loop_config={"spec": spec},
                           scaling_config=ray.train.ScalingConfig(
                               num_workers=world, use_gpu=torch.cuda.is_available(),
                               resources_per_worker=None if torch.cuda.is_available() else {"CPU": cpus_per_worker}),
                           run_config=ray.train.RunConfig(name=f"mfu-{world}-{int(t0)}", storage_path=d + "/ray"))
    try:
        res = trainer.fit()
    except Exception as e:  # noqa: BLE001 — one failed path must not lose the other figures
        return {"error": repr(e)[:500]}
    if res.error:
        return {"error": repr(res.error)}
    return summarise(d, a, world, time.time() - t0)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_torchrun(a: argparse.Namespace, world: int, argv: list[str] | None = None) -> dict:
    """The same loop under torchrun (no Ray); ``argv`` are this script's options for the worker processes."""
    d = tempfile.mkdtemp(prefix=f"mfu-torchrun{world}-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           "--worker", d, *(sys.argv[1:] if argv is None else argv)]
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    if not a.worker and "--no-compile" in (argv or []) and not _cuda():
        env["OMP_NUM_THREADS"] = "1"  # what Ray gives a worker holding 1 CPU: compare like with like
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode:
        return {"error": f"torchrun exited {r.returncode}"}
    return summarise(d, a, world, time.time() - t0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the medians (compile, allocator)")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--modes", default="ray,torchrun", help="ray,torchrun: which paths to run at --gpus")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--ac", choices=("none", "full", "selective"), default="none",
                    help="activation checkpointing per block (training/parallel.AC_MODES)")
    ap.add_argument("--loss", choices=["fused", "plain"], default="fused",
                    help="fused: head + cross-entropy compiled together; plain: Transformer.forward's fp32 logits")
    ap.add_argument("--profile", metavar="FILE", help="torchrun only: write the run's CUDA kernels by total time "
                    "(torch.profiler, every step including compile) to FILE")
    ap.add_argument("--worker", metavar="METRICS_DIR", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> int:
    a = parse_args()

    if a.worker:  # inside torchrun
        from training.loop import run_worker
        spec = make_spec(a, int(os.environ["WORLD_SIZE"]), a.worker)
        if not a.profile:
            run_worker(spec, LocalSession())
            return 0
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_worker(spec, LocalSession())
        if int(os.environ.get("RANK", 0)) == 0:
            Path(a.profile).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40,
                                                                 max_name_column_width=90))
        return 0

    import torch
    out: dict = {"bench": "pretrain_mfu", "preset": a.preset, "seq": a.seq, "micro_batch_per_gpu": a.micro,
                 "compile": not a.no_compile, "activation_checkpointing": a.ac, "loss": a.loss,
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    modes = a.modes.split(",")
    if "ray" in modes:
        out[f"ray_{a.gpus}gpu"] = run_ray(a, a.gpus)
        if a.gpus > 1:
            out["ray_1gpu"] = run_ray(a, 1)
            one, many = out["ray_1gpu"], out[f"ray_{a.gpus}gpu"]
            if "tokens_per_s" in one and "tokens_per_s" in many:
                out["scaling"] = round(many["tokens_per_s"] / one["tokens_per_s"], 3)
    if "torchrun" in modes:
        out[f"torchrun_{a.gpus}gpu"] = run_torchrun(a, a.gpus)
        r, t = out.get(f"ray_{a.gpus}gpu", {}), out[f"torchrun_{a.gpus}gpu"]
        if "tokens_per_s" in r and "tokens_per_s" in t:
            out["ray_overhead"] = round(1 - r["tokens_per_s"] / t["tokens_per_s"], 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
