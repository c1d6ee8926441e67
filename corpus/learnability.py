"""Is a prepared corpus learnable? Train a small model briefly (plain PyTorch, no Ray) and compare with the unigram entropy.

Runbook::

    llamaray clean --set out=runs/data/default              # prepare the embedded default corpus first
    python -m corpus.learnability runs/data/default --steps 300 --batch 16
    # on a machine without pyarrow (the GPU box): export the splits to one .npz here, train there
    python -m corpus.learnability runs/data/default --export runs/data/default.npz
    python -m corpus.learnability runs/data/default.npz --steps 300 --device cuda

Prints one JSON line: parameters, steps, the validation loss before and after training, and the unigram entropy of
the training split (all in nats). "Learnable" means the final validation loss is well below the unigram entropy,
i.e. the model uses context, not only token frequencies. This is a data check, not the trainer: no FSDP, no
checkpoints, one process (see jobs/pretrain.py for the real run).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.llama import ModelArgs, build_model


def load_rows(split_dir: Path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus.pipeline import shard_files
    t = pa.concat_tables([pq.read_table(f, columns=["tokens"]) for f in shard_files(split_dir)])
    return np.stack(t.column("tokens").to_numpy(zero_copy_only=False)).astype(np.int32)


def load(prepared: Path) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(train rows, val rows, tokenizer vocab size, unigram entropy in nats) from a prepared dir or an exported .npz."""
    if prepared.suffix == ".npz":
        z = np.load(prepared)
        train, val, vocab, entropy = z["train"], z["val"], int(z["vocab_size"]), float(z["unigram_entropy"])
    else:
        from corpus.pipeline import unigram_entropy
        stats = json.loads((prepared / "stats.json").read_text())
        train, val = load_rows(prepared / "train"), load_rows(prepared / "val")
        vocab, entropy = stats["vocab_size"], unigram_entropy(prepared / "train")
    return torch.from_numpy(train.astype(np.int64)), torch.from_numpy(val.astype(np.int64)), vocab, entropy


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = []
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch]
        logits = model(x[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item())
    model.train()
    return sum(losses) / (len(rows) * (rows.shape[1] - 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corpus.learnability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prepared", type=Path, help="a directory written by llamaray clean / corpus.pipeline.prepare")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--export", type=Path, help="write the splits and entropy to this .npz and exit")
    args = ap.parse_args(argv)

    train, val, vocab, entropy = load(args.prepared)
    if args.export:
        np.savez_compressed(args.export, train=train.numpy().astype(np.int32), val=val.numpy().astype(np.int32),
                            vocab_size=vocab, unigram_entropy=entropy)
        return 0
    margs = ModelArgs.from_name(args.preset)
    if vocab > margs.vocab_size or train.shape[1] - 1 > margs.max_seq_len:
        raise SystemExit(f"{args.prepared}: vocab {vocab} / seq {train.shape[1] - 1} do not fit preset "
                         f"{args.preset} (vocab {margs.vocab_size}, context {margs.max_seq_len})")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    train, val = train.to(dev), val.to(dev)
    model = build_model(margs, seed=args.seed).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    before = evaluate(model, val, args.batch)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x = train[torch.randint(len(train), (args.batch,), generator=g).to(dev)]
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    after = evaluate(model, val, args.batch)
    print(json.dumps({"params": margs.num_params(), "preset": args.preset, "steps": args.steps, "batch": args.batch,
                      "seq_len": train.shape[1] - 1, "train_sequences": len(train), "val_sequences": len(val),
                      "val_loss_before": round(before, 4), "val_loss_after": round(after, 4),
                      "train_loss_last": round(loss.item(), 4),
                      "unigram_entropy_nats": round(entropy, 4), "train_seconds": round(seconds, 1),
                      "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
