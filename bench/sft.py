"""SFT training throughput with and without LoRA, through the real job (jobs/sft.sft on Ray Train): JSON lines.

Runbook::

    .venv/bin/python bench/sft.py                      # tiny preset on CPU, 2 Ray workers, 30 steps per mode
    .venv/bin/python bench/sft.py --steps 50 --workers 1 --rank 16
    python3 bench/sft.py --preset llama-1b --gpu --out $OUT/sft      # one H100: llama-1b, 1 worker, bf16 FSDP2

Both modes use the same rows, the same batch and fresh random weights of the preset (no hub): first full
fine-tuning, then LoRA (rank ``--rank`` on wq wk wv wo, base frozen). Rows are generated arithmetic word problems
(tasks/arithmetic.py) rendered with a SentencePiece tokenizer trained on them: single-turn chats (≈40 tokens) on the
tiny preset, multi-turn chats of ``--chat-tokens`` 512–1024 tokens on llama-1b (the job right-pads each micro-batch
to its longest row, so padding counts as work like it does in training).

Figures per mode (steps after the first ``--skip`` warm-up steps):
- ``tokens_per_s``: tokens fed to the model (padding included, summed over workers; recomputed here from the
  rendered rows and the job's data addressing) in the timed steps, over the wall time between the appearance of the
  warm-up's last metrics.csv row and of the final one (polled every 20 ms by the driver; each row is written after
  its step's host sync, so the window holds whole steps whatever the job's own timer does);
  ``job_tokens_per_s``: the median of the job's own column.
- ``peak_mem_gb``: the job's metrics column (torch.cuda.max_memory_allocated on GPU, RSS on CPU) when it logs one;
  ``gpu_mem_used_max_gb``: the most nvidia-smi showed in use on the card while the mode ran (CUDA context and the
  allocator's cache included), sampled every 0.5 s.
- ``trainable_params`` (the job's report), ``wall_s`` (the whole sft() call: Ray Train start, model build on CPU
  and move to the device, steps, the final DCP checkpoint), ``setup_s`` (sft() start → first metrics row),
  ``teardown_s`` (last row → sft() returns: checkpoint, export is off), ``mfu`` (GPU only: 6N + attention FLOPs at
  the mean padded row length, H100 bf16 peak 989 TFLOP/s).
Every finished stage prints one JSON line (also appended to ``--out``/results.jsonl), so a timeout leaves numbers.

Measured here (2026-11-25, the shared 2-core CPU VM, tiny preset, 2 Ray workers, 30 steps of 32 chats, two runs):
full 4262 / 4309 tokens/s (3.95 M trainable), LoRA r8 5483 / 5078 tokens/s (57 k trainable): ×1.29 / ×1.18
(those runs used the job's own tokens/s column).
LoRA skips the weight gradients of the frozen matrices and their AdamW state but still back-propagates through every
layer, so the gain is modest on compute and larger on memory.
Leaves out: evaluation (off), export (off), torch.compile (the job's default: off), multi-GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {
    # preset: (steps, workers, batch, micro, rows, chat token range (0, 0) = single-turn rows)
    "tiny": dict(steps=30, workers=2, batch=32, micro=16, rows=2000, chat_tokens=(0, 0)),
    "llama-1b": dict(steps=25, workers=1, batch=32, micro=8, rows=800, chat_tokens=(512, 1024)),
}


class Emitter:
    """Prints one JSON line per finished stage and appends it to <out>/results.jsonl (thread-safe), so a run cut
    off by a time limit still leaves its figures. Shared by bench/sft.py and bench/smollm2_recipe.py."""

    def __init__(self, out: Path | None, base: dict) -> None:
        self.base, self.lock, self.path = base, threading.Lock(), None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.path = out / "results.jsonl"

    def __call__(self, stage: str, **fields) -> None:
        line = json.dumps({**self.base, "stage": stage, **fields})
        with self.lock:
            print(line, flush=True)
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(line + "\n")


@contextlib.contextmanager
def scratch_dir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created, left in place) or a temporary directory removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


class _Poller:
    """Calls ``poll()`` at once and then every ``every_s`` seconds on a daemon thread, inside a ``with`` block."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self._stop = every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            self.poll()
            if self._stop.wait(self.every_s):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


class GpuMemPoller(_Poller):
    """Highest ``memory.used`` nvidia-smi reports for the card while running (MiB → GB); None without nvidia-smi."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(every_s)
        self.max_mib: float | None = None

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
            return max(float(x) for x in out.stdout.split()) if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def poll(self) -> None:
        v = self.read()
        if v is not None:
            self.max_mib = v if self.max_mib is None else max(self.max_mib, v)

    @property
    def max_gb(self) -> float | None:
        return None if self.max_mib is None else round(self.max_mib * 1.048576 / 1e3, 2)


class RowClock(_Poller):
    """Driver-side clock of a run's metrics.csv: the wall time at which each step's row appears (polled every
    ``every_s``), so step intervals are measured by the same clock for every mode and device, independent of where
    the job's own timer synchronises (its ``tokens_per_s`` column is reported next to this one)."""

    def __init__(self, csv_path: Path, every_s: float = 0.02) -> None:
        super().__init__(every_s)
        self.path = csv_path
        self.seen: dict[int, float] = {}
        self._size = -1

    def poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size == self._size:
            return
        now = time.time()
        self._size = size
        from training.metrics import read_csv

        for r in read_csv(self.path):
            try:
                self.seen.setdefault(int(r["step"]), now)
            except (KeyError, ValueError):  # a row being written
                self._size = -1


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------ rows


def make_rows(n: int, chat_tokens: tuple[int, int], tok, seed: int = 0) -> list[dict]:
    """``n`` chat rows: single-turn worked answers, or multi-turn chats of about chat_tokens[0]..[1] tokens (one
    problem and its worked answer per turn, turns added until the row's estimated length reaches a target drawn
    uniformly from the range)."""
    from tasks.arithmetic import problems, sft_row

    lo, hi = chat_tokens
    if hi <= 0:
        return [sft_row(p) for p in problems(n, seed=seed)]
    rng = random.Random(seed)
    pool = problems(max(4 * n, 1000), seed=seed + 1)
    cost = [len(tok.encode(p.prompt)) + len(tok.encode(p.solution)) + 6 for p in pool]  # + template tokens
    rows, j = [], 0
    for i in range(n):
        target, est, msgs = rng.randint(lo, hi), 0, []
        while est < target:
            p = pool[j % len(pool)]
            msgs += [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.solution}]
            est += cost[j % len(pool)]
            j += 1
        rows.append({"id": f"chat-{i:06d}", "messages": msgs})
    return rows


def step_tokens(lengths: list[int], step: int, batch: int, micro: int, workers: int) -> int:
    """Tokens the job feeds the model in optimizer step ``step`` (1-based): training/data_stream.micro_batch_indices
    addressing over the rendered train split (wrapping), each micro-batch right-padded to its longest row."""
    n, accum = len(lengths), batch // (micro * workers)
    consumed = (step - 1) * batch
    total = 0
    for a in range(accum):
        for r in range(workers):
            start = consumed + (a * workers + r) * micro
            total += micro * max(lengths[(start + k) % n] for k in range(micro))
    return total


# ------------------------------------------------------------------------------------------------ one mode


def run_mode(name: str, d: Path, tok_dir: Path, data: Path, a: argparse.Namespace, lora: bool) -> dict:
    import pyarrow.parquet as pq

    from core.config import load_config
    from training.metrics import read_csv
    from jobs.sft import SftConfig, sft
    from model.llama import ModelArgs

    over = [f"tokenizer={tok_dir}", f"data.train={data}", "data.val_fraction=0.0", "eval.metric=none",
            f"model.preset={a.preset}", f"train.max_steps={a.steps}", f"train.batch_size={a.batch}",
            f"train.micro_batch_size={a.micro}", "train.warmup_steps=2", f"run.storage={d}", f"run.name={name}",
            "run.ckpt_every=0", "run.eval_every=0", "run.progress=false", "run.export=false",
            "run.max_failures=0",  # an OOM fails the mode at once instead of rebuilding the model 3 more times
            f"scaling.num_workers={a.workers}", f"scaling.use_gpu={str(a.gpu).lower()}",
            f"scaling.cpus_per_worker={a.cpus_per_worker:g}", f"lora.enabled={str(lora).lower()}",
            f"lora.rank={a.rank}", f"lora.alpha={2.0 * a.rank}"]
    cfg = load_config(SftConfig, "sft-tiny", over)
    rd = d / name
    clock = RowClock(rd / "metrics" / "metrics.csv")
    poller = GpuMemPoller() if a.gpu else None
    t0 = time.time()
    error = None
    with clock:
        try:
            if poller:
                with poller:
                    sft(cfg)
            else:
                sft(cfg)
        except Exception as e:  # noqa: BLE001 — e.g. the final checkpoint finds a full disk: keep the steps' figures
            error = f"{type(e).__name__}: {str(e)[-1500:]}"
    t1 = time.time()
    rows = read_csv(rd / "metrics" / "metrics.csv")
    if not rows:
        raise RuntimeError(error or "the job wrote no metrics rows")
    report_file = rd / "metrics" / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    lengths = [len(x) for x in pq.read_table(rd / "data" / "train.parquet", columns=["inputs"])
               .column("inputs").to_pylist()]
    steps = [int(r["step"]) for r in rows]
    toks = {s: step_tokens(lengths, s, a.batch, a.micro, a.workers) for s in steps}
    # Throughput over the timed window: the tokens of steps skip+1 .. last over the time from the appearance of row
    # `skip` to that of the last row (each row is written after its step's host sync, so the window holds whole
    # steps; the 20 ms polling jitter is two readings over the whole window, not one per step).
    first, last = a.skip, max(steps, default=0)
    window = clock.seen.get(last, 0) - clock.seen.get(first, 0) if first in clock.seen and last > first else 0
    wall_tps = sum(toks[s] for s in steps if s > first) / window if window > 0 else None
    job_tps = [float(r["tokens_per_s"]) for r in rows if int(r["step"]) > a.skip] or \
        [float(r["tokens_per_s"]) for r in rows]
    peaks = [float(r["peak_mem_gb"]) for r in rows if r.get("peak_mem_gb") not in (None, "")]
    tps = wall_tps if wall_tps else statistics.median(job_tps)
    args = ModelArgs.from_name(a.preset)
    mean_tokens = statistics.mean(toks[s] for s in steps) if steps else 0
    mean_len = mean_tokens / a.batch if steps else 0
    out = {"mode": name, "tokens_per_s": round(tps, 1), "job_tokens_per_s": round(statistics.median(job_tps), 1),
           "tokens_per_step": round(mean_tokens), "mean_padded_row_len": round(mean_len, 1),
           "steps_timed": last - first if wall_tps else 0, "timed_window_s": round(window, 2),
           "trainable_params": report.get("trainable_params"),
           "peak_mem_gb": round(max(peaks), 2) if peaks else None,
           "gpu_mem_used_max_gb": poller.max_gb if poller else None,
           "final_loss": float(rows[-1]["loss"]) if rows else None, "wall_s": round(t1 - t0, 1),
           "setup_s": round(clock.seen[min(clock.seen)] - t0, 1) if clock.seen else None,
           "teardown_s": round(t1 - clock.seen[max(clock.seen)], 1) if clock.seen else None}
    if report.get("trainable_params") is None and rows[-1].get("trainable_params"):
        out["trainable_params"] = int(float(rows[-1]["trainable_params"]))
    if error:
        out["error"] = error
    if a.gpu:
        from training.flops import peak_flops

        peak = peak_flops(gpu_name() or "")  # None on a card without a datasheet figure: no MFU rather than a wrong one
        out["mfu"] = round(tps * args.flops_per_token(int(mean_len)) / (peak * a.workers), 4) if peak else None
    if not a.keep:
        shutil.rmtree(rd, ignore_errors=True)  # llama-1b full: ~15 GB of DCP checkpoint
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--gpu", action="store_true", help="scaling.use_gpu=true (one GPU per worker, bf16 FSDP2)")
    ap.add_argument("--steps", type=int, help="optimizer steps per mode (preset default)")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--batch", type=int, help="chats per optimizer step")
    ap.add_argument("--micro", type=int, help="chats per forward/backward")
    ap.add_argument("--rows", type=int, help="distinct chats generated")
    ap.add_argument("--chat-tokens", help="MIN,MAX tokens of a multi-turn chat (0,0: single-turn rows)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank)")
    ap.add_argument("--cpus-per-worker", type=float, help="default 1 on CPU, 8 with --gpu (threads of the CPU-side "
                                                           "model build)")
    ap.add_argument("--modes", default="full,lora", help="which modes, in order")
    ap.add_argument("--out", type=Path, help="also append every JSON line to OUT/results.jsonl")
    ap.add_argument("--keep", type=Path, help="keep the runs under this directory (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    for k in ("steps", "workers", "batch", "micro", "rows"):
        if getattr(a, k) is None:
            setattr(a, k, p[k])
    a.chat_tokens = tuple(int(x) for x in a.chat_tokens.split(",")) if a.chat_tokens else p["chat_tokens"]
    if a.cpus_per_worker is None:
        a.cpus_per_worker = 8.0 if a.gpu else 1.0
    from training.sft_data import write_jsonl
    from model.tokenizer import SentencePieceTokenizer
    from tasks.arithmetic import problems

    t_start = time.time()
    emit = Emitter(a.out, {"bench": "sft", "preset": a.preset, "device": (gpu_name() or "cuda") if a.gpu else "cpu",
                           "machine": platform.node(), "workers": a.workers, "steps": a.steps, "batch": a.batch,
                           "micro": a.micro, "skip": a.skip})
    with scratch_dir(a.keep, "bench-sft-") as d:
        text = d / "text.txt"
        text.write_text("\n".join(p.prompt + " " + p.solution for p in problems(2000, seed=0)))
        tok = SentencePieceTokenizer.train([text], d / "tok", vocab_size=1000)
        rows = make_rows(a.rows, a.chat_tokens, tok)
        lens = sorted(len(tok.render_chat(r["messages"])[0]) for r in rows)
        data = write_jsonl(rows, d / "train.jsonl")
        emit("data", rows=len(rows), row_tokens_min=lens[0], row_tokens_median=lens[len(lens) // 2],
             row_tokens_max=lens[-1], prep_s=round(time.time() - t_start, 1))
        results = {}
        for mode in a.modes.split(","):
            if mode not in ("full", "lora"):
                raise SystemExit(f"--modes: unknown mode {mode!r} (full, lora)")
            name = mode if mode == "full" else f"lora_r{a.rank}"
            t_mode = time.time()
            try:
                results[name] = run_mode(name, d, d / "tok", data, a, lora=mode == "lora")
            except Exception as e:  # noqa: BLE001 — one failed mode (e.g. out of memory) must not cost the other
                emit(name, error=f"{type(e).__name__}: {str(e)[-2000:]}", wall_s=round(time.time() - t_mode, 1))
                shutil.rmtree(d / name, ignore_errors=True)
                continue
            emit(name, **results[name])
        summary = {**results, "total_s": round(time.time() - t_start, 1)}
        if "full" in results and f"lora_r{a.rank}" in results:
            lora_tps, full_tps = results[f"lora_r{a.rank}"]["tokens_per_s"], results["full"]["tokens_per_s"]
            summary["lora_speedup"] = round(lora_tps / full_tps, 3)
        emit("summary", **summary)
    return 0

if __name__ == "__main__":
    sys.exit(main())
