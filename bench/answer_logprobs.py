"""DPO's answer scoring on a GPU: full-vocabulary logits (``sequence_logprobs(model(tokens))``) vs the output head on
answer positions only (``jobs/sft.answer_logprobs``) — peak memory and time of forward + backward, one process.

    python bench/answer_logprobs.py                    # llama-1b, bf16, 16 rows × 1024 tokens, last 256 = answer

Plain model (no FSDP, no Ray): the difference is the head, which is the same under FSDP. Prints one JSON line.

Measured 2026-11-26, one H100 80GB HBM3 (nvidia-h100-x1), torch 2.11.0+cu130, defaults (medians of 5 after one
warm-up): full logits 320.3 ms, 59.0 GB peak; answer positions only 275.7 ms, 40.0 GB — 19 GB less, 1.16× faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.objectives.finetune import answer_logprobs  # noqa: E402
from model.llama import ModelArgs, build_model  # noqa: E402
from model.losses import IGNORE, sequence_logprobs  # noqa: E402


def measure(fn, reps: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn().sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"ms": round(statistics.median(times[1:]) * 1e3, 1), "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--answer", type=int, default=256, help="answer tokens at the end of each row")
    ap.add_argument("--reps", type=int, default=6)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/answer_logprobs.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args = ModelArgs.from_name(a.preset)
    model = build_model(args, device="cuda", seed=0).to(torch.bfloat16)
    tokens = torch.randint(0, args.vocab_size, (a.rows, a.seq), device="cuda")
    labels = torch.full_like(tokens, IGNORE)
    labels[:, -a.answer:] = tokens[:, -a.answer:]
    with torch.no_grad():
        torch.testing.assert_close(answer_logprobs(model, tokens, labels),
                                   sequence_logprobs(model(tokens), labels), rtol=1e-3, atol=0.5)
    out = {"bench": "answer_logprobs", "preset": a.preset, "rows": a.rows, "seq": a.seq, "answer": a.answer,
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "full_logits": measure(lambda: sequence_logprobs(model(tokens), labels), a.reps),
           "answer_only": measure(lambda: answer_logprobs(model, tokens, labels), a.reps)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
