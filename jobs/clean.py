"""Clean, dedup, tokenize and pack a pretraining corpus with Ray Data; print what each step removed.

Runbook::

    llamaray clean                                   # the embedded default corpus → runs/data/default
    llamaray clean --config configs/tiny.yaml        # a pretrain config works too: its data: and model: are used
    python -m jobs.clean --set out=runs/data/mine \\
        --set 'data.sources=[{path: "s3://bucket/web/*.jsonl", weight: 0.7}, {path: corpus/x.txt, weight: 0.3}]' \\
        --set data.seq_len=512 --set vocab_size=8192

Leaves in ``out``: ``train/`` and ``val/`` parquet shards (idx, tokens[seq_len+1]), ``stats.json`` (documents read
per source, removed by each step — too_short, too_long, non_letter, repeated_lines, exact_dup, near_dup — kept,
tokens, sequences, token shares after mixing), ``tokenizer/`` (trained on the cleaned text when ``data.tokenizer``
is empty, with ``vocab_size``), ``work/`` (cleaned and tokenized documents, reused on reruns) and ``DONE``.
A rerun with the same config and inputs is a no-op. ``pretrain`` calls the same functions
(``corpus.pipeline.ensure_tokenizer`` then ``prepare``) before its workers start.

What it leaves out: no language identification, no PII scrubbing, no quality classifier; near dedup runs in the
driver's memory (fine to millions of documents, not billions). Ray: connects to ``ray_address`` if given, else
starts a local instance with ``num_cpus``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus.config import DataConfig
from core.config import ConfigError, load_config, run_job
from model.llama import ModelArgs


@dataclass
class CleanJobConfig:
    """Settings of ``llamaray clean``."""

    data: DataConfig = field(default_factory=DataConfig)
    """Sources, cleaning thresholds, sequence length, split (see corpus/config.py)."""
    model: ModelArgs = field(default_factory=lambda: ModelArgs.from_name("tiny"))
    """The model the data is for: its max_seq_len bounds data.seq_len and its vocab_size is the size of a
    tokenizer trained here (unless vocab_size is set)."""
    out: str = "runs/data/default"
    """Output directory (train/, val/, stats.json, tokenizer/, DONE)."""
    vocab_size: int = 0
    """Vocabulary of a tokenizer trained on the cleaned corpus when data.tokenizer is empty; 0 = model.vocab_size."""
    ray_address: str = ""
    """Ray cluster to connect to (``auto``, ``ray://host:10001``); empty starts a local Ray."""
    num_cpus: int = 0
    """CPUs of a local Ray (0 = all)."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out: must name an output directory")
        if self.vocab_size < 0:
            raise ConfigError(f"vocab_size: must be >= 0, got {self.vocab_size}")
        if self.vocab_size > self.model.vocab_size:
            raise ConfigError(f"vocab_size={self.vocab_size} is larger than model.vocab_size={self.model.vocab_size}")
        if self.num_cpus < 0:
            raise ConfigError(f"num_cpus: must be >= 0, got {self.num_cpus}")


def load_clean_config(path: str | None, overrides: list[str]) -> CleanJobConfig:
    """A clean config, or a pretrain YAML whose other sections (train:, run:, …) are ignored; overrides are strict."""
    return load_config(CleanJobConfig, path, overrides, ignore_other_sections=True)


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as a fixed-width table: one row per source, one column per removal step."""
    steps = list(stats["removed"])
    cols = ["source", "read"] + steps + ["kept", "tokens", "train%", "weight%"]
    rows = []
    for name, s in stats["sources"].items():
        rows.append([name, s["documents_read"]] + [s["removed"][k] for k in steps] +
                    [s["kept"], s.get("tokens", ""), f"{100 * s.get('train_token_share', 0):.1f}",
                     f"{100 * s.get('weight_share', 0):.1f}"])
    rows.append(["total", stats["documents_read"]] + [stats["removed"][k] for k in steps] +
                [stats["kept"], stats.get("tokens", ""), "100.0", "100.0"])
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append(f"normalization {stats['normalization']}; sequences of {stats['seq_len']}+1 tokens: "
                 f"train {stats['train_sequences']}, val {stats['val_sequences']}; vocab {stats['vocab_size']}")
    return "\n".join(lines)


def clean(cfg: CleanJobConfig) -> dict[str, Any]:
    """Validate the sources (before Ray starts), then clean, dedup, tokenize and pack them into ``cfg.out``."""
    from cluster.connect import connect
    from corpus import pipeline

    pipeline.validate(cfg.data, max_seq_len=cfg.model.max_seq_len)
    connect(cfg.ray_address or None, num_cpus=cfg.num_cpus or None)
    out = Path(cfg.out)
    tok_dir = pipeline.ensure_tokenizer(cfg.data, out, cfg.vocab_size or cfg.model.vocab_size)
    prepared = pipeline.prepare(dataclasses.replace(cfg.data, tokenizer=tok_dir), out,
                                max_seq_len=cfg.model.max_seq_len)
    if prepared.stats["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer {tok_dir} has {prepared.stats['vocab_size']} ids but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    return {"stats": prepared.stats, "out": str(out), "train_dir": str(prepared.train_dir),
            "val_dir": str(prepared.val_dir), "num_train": prepared.num_train, "num_val": prepared.num_val,
            "unigram_entropy_nats": round(pipeline.unigram_entropy(prepared.train_dir), 4)}


def show(result: dict[str, Any], cfg: CleanJobConfig) -> None:
    print(format_stats(result["stats"]))
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}))


def main(argv: list[str] | None = None) -> int:
    return run_job("clean", __doc__, argv, CleanJobConfig, clean, show=show, errors=(ValueError, FileNotFoundError),
                   load=lambda _cls, path, overrides: load_clean_config(path, overrides))


if __name__ == "__main__":
    sys.exit(main())
