"""Packed vs padded SFT rows, one process, no Ray: real (non-pad) tokens/s of forward + backward + AdamW; one JSON line.

Runbook::

    .venv/bin/python bench/sft_packing.py                         # tiny preset, CPU, 2 threads
    .venv/bin/python bench/sft_packing.py --threads 16 --steps 40

Rows: synthetic chats with tests/sft_task.py's length spread (38–65 tokens, uniform; the second half labelled), the
same rows for both modes. Packed: ``training/sft_data.pack_groups`` into ``--pack-len`` rows, micro-batches of
``--micro`` packed rows, document mask (SDPA boolean mask) and restarting positions. Padded (the job's default):
micro-batches of as many chats as a packed micro-batch holds on average, right-padded to the longest, so both modes
take steps of the same chats and differ only in padding and attention. Both run ``sft_loss`` (training/objectives/sft.py) after
``--skip`` warm-up steps; ``real_tokens_per_s`` counts only chat tokens, ``real_token_share`` is real / fed tokens.
Leaves out: Ray Train and FSDP (bench/sft.py measures the job), GPU attention kernels for packed rows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.llama import ModelArgs, build_model  # noqa: E402
from model.losses import IGNORE  # noqa: E402
from training.objectives.sft import sft_loss  # noqa: E402
from training.sft_data import collate, pack_groups  # noqa: E402


def chats(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(38, 65)
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        out.append((ids, [IGNORE] * (length // 2) + ids[length // 2:]))
    return out


def measure(rows: list[list[tuple[list[int], list[int]]]], packed: bool, micro: int, a: argparse.Namespace,
            args: ModelArgs) -> dict[str, float]:
    model = build_model(args, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = fed = 0
    t0 = 0.0
    for step in range(a.skip + a.steps):
        if step == a.skip:
            real, fed, t0 = 0, 0, time.perf_counter()
        start = step * micro % (len(rows) - micro)
        batch = collate(rows[start:start + micro], 0, packed)
        loss, _ = sft_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real, fed = real + int((batch["doc"] >= 0).sum()), fed + batch["tokens"].numel()
    dt = time.perf_counter() - t0
    return {"real_tokens_per_s": round(real / dt), "tokens_per_s": round(fed / dt),
            "real_token_share": round(real / fed, 3), "ms_per_step": round(1000 * dt / a.steps, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--pack-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    args = ModelArgs.from_name(a.preset)
    data = chats(4000, args.vocab_size)
    groups = pack_groups([(len(x),) for x, _ in data], a.pack_len)
    per_row = len(data) / len(groups)
    out = {"bench": "sft_packing", "preset": a.preset, "threads": a.threads, "micro": a.micro,
           "pack_len": a.pack_len, "chats_per_packed_row": round(per_row, 2),
           "padded_micro": round(a.micro * per_row),
           "padded": measure([[c] for c in data], False, round(a.micro * per_row), a, args),
           "packed": measure([[data[j] for j in g] for g in groups], True, a.micro, a, args)}
    out["real_tokens_per_s_ratio"] = round(out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
