"""Packed vs padded SFT rows, one process, no Ray: real (non-pad) tokens/s of forward + backward + AdamW; one JSON line.

Runbook::

    .venv/bin/python bench/sft_packing.py                         # tiny preset, CPU, 2 threads
    .venv/bin/python bench/sft_packing.py --threads 16 --steps 40

Rows: synthetic chats with tests/sft_task.py's length spread (38–65 tokens, uniform; the second half labelled), the
same rows for both modes. Packed: ``training/sft_data.pack_groups`` into ``--pack-len`` rows, micro-batches of
``--micro`` packed rows, document mask (SDPA boolean mask) and restarting positions. Padded (the job's default):
micro-batches of as many chats as a packed micro-batch holds on average, right-padded to the longest, so both modes
take steps of the same chats and differ only in padding and attention. Both run ``sft_loss``
(training/objectives/sft.py), step by step in turn, timed after ``--skip`` warm-up steps; ``real_tokens_per_s``
counts only chat tokens, ``real_token_share`` is real / fed tokens.

Measured here (2026-12-07, the shared 2-core VM under a load average of 8–25 from other work, so only the ratio of
the interleaved modes means anything): ``--micro 4 --steps 10``: real-token share 0.798 padded → 0.96 packed, yet
real tokens/s × 0.91 packed. On CPU the boolean mask sends SDPA to its math path, which scores every (query, key)
pair of a 256-token row (4 × 256² per micro-batch against 19 × 65² for the padded rows, whose causal SDPA also
skips the upper triangle): on this tiny model the extra attention costs more than the padding saves. Packing pays
where attention skips masked blocks (flex_attention / varlen on GPU: not built yet) or where rows vary in length
far more than these chats.
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


class Mode:
    """One mode's model, optimizer, micro-batches and running totals."""

    def __init__(self, rows: list[list[tuple[list[int], list[int]]]], packed: bool, micro: int,
                 args: ModelArgs) -> None:
        self.rows, self.packed, self.micro = rows, packed, micro
        self.model = build_model(args, seed=0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.real = self.fed = 0
        self.seconds = 0.0

    def step(self, i: int, timed: bool) -> None:
        start = i * self.micro % (len(self.rows) - self.micro)
        batch = collate(self.rows[start:start + self.micro], 0, self.packed)
        t0 = time.perf_counter()
        loss, _ = sft_loss(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if timed:
            self.seconds += time.perf_counter() - t0
            self.real, self.fed = self.real + int((batch["doc"] >= 0).sum()), self.fed + batch["tokens"].numel()

    def figures(self, steps: int) -> dict[str, float]:
        return {"real_tokens_per_s": round(self.real / self.seconds), "tokens_per_s": round(self.fed / self.seconds),
                "real_token_share": round(self.real / self.fed, 3),
                "ms_per_step": round(1000 * self.seconds / steps, 1)}


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
    modes = {"padded": Mode([[c] for c in data], False, round(a.micro * per_row), args),
             "packed": Mode([[data[j] for j in g] for g in groups], True, a.micro, args)}
    for i in range(a.skip + a.steps):  # the modes take turns, so a busy machine slows both alike
        for mode in modes.values():
            mode.step(i, timed=i >= a.skip)
    out = {"bench": "sft_packing", "preset": a.preset, "threads": a.threads, "micro": a.micro,
           "pack_len": a.pack_len, "chats_per_packed_row": round(per_row, 2), "padded_micro": modes["padded"].micro,
           **{name: mode.figures(a.steps) for name, mode in modes.items()}}
    out["real_tokens_per_s_ratio"] = round(out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
