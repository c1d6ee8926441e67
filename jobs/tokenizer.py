"""Train llamaray's SentencePiece BPE tokenizer on text files.

Runbook::

    llamaray tokenizer --config tokenizer-tiny --set 'input=[corpus/*.txt,extra.jsonl]' --set vocab_size=4096 \\
        --set out=runs/tok
    # the same, as `ray job submit` runs it:
    python -m jobs.tokenizer --set 'input=[a.txt,b.txt]' --set vocab_size=4096 --set out=runs/tok

The list is YAML: quote an item that starts with ``*`` (``'input=["*.txt"]'``), else YAML reads it as an alias.
Inputs are files or glob patterns: ``.txt`` (every non-blank line is a training sentence) and ``.jsonl`` (the string
field ``text_field`` of every record; its lines are sentences). The output directory holds ``tokenizer.model``,
``tokenizer_config.json`` (with the chat template) and ``special_tokens_map.json`` — what ``AutoTokenizer``, vLLM and
``model.tokenizer.load_tokenizer`` read — and prints one JSON line (output directory, files, vocab size, seconds).

What it leaves out: it runs on the local process (one CPU thread; a few MB of text trains in seconds) — no Ray, since
SentencePiece training is single-node anyway. Corpora are read fully into memory; sample a large corpus first.
A small corpus may support fewer merges than ``vocab_size``: then the vocabulary is smaller (a warning says so)
unless ``exact_vocab=true``, which fails instead.
"""

from __future__ import annotations

import glob
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError, run_job
from model.tokenizer import MIN_VOCAB, SentencePieceTokenizer


@dataclass
class TokenizerJobConfig:
    """Settings of ``llamaray tokenizer``."""

    input: list[str] = field(default_factory=list)
    """Training files or glob patterns (.txt or .jsonl)."""
    out: Path = Path("runs/tokenizer")
    """Directory to write the tokenizer files into (created if missing)."""
    vocab_size: int = 4096
    """Requested number of ids, including 4 control tokens, 4 chat markers and 256 byte pieces."""
    text_field: str = "text"
    """The string field of each .jsonl record that holds the text."""
    max_sentence_length: int = 4096
    """Longest training sentence in bytes: lines are cut into chunks of max_sentence_length // 4 characters (a UTF-8
    character takes at most 4 bytes), so SentencePiece never silently drops a long line."""
    seed: int = 0
    """Seed of SentencePiece's random generator (training is deterministic for a given seed and input)."""
    exact_vocab: bool = False
    """Fail, rather than warn, when the corpus supports fewer than vocab_size ids."""
    model_max_length: int | None = None
    """Optional context length recorded in tokenizer_config.json (model_max_length)."""

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("tokenizer.input: give at least one training file or glob, "
                              "e.g. --set 'input=[corpus.txt]'")
        if self.vocab_size <= MIN_VOCAB:
            raise ConfigError(f"tokenizer.vocab_size must exceed {MIN_VOCAB} (control tokens, chat markers and 256 "
                              f"byte pieces), got {self.vocab_size}")
        if self.max_sentence_length < 16:
            raise ConfigError(f"tokenizer.max_sentence_length must be >= 16 bytes, got {self.max_sentence_length}")
        if not self.text_field:
            raise ConfigError("tokenizer.text_field must not be empty")
        if self.model_max_length is not None and self.model_max_length <= 0:
            raise ConfigError(f"tokenizer.model_max_length must be positive, got {self.model_max_length}")


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand globs (sorted, so runs are reproducible); each pattern must match at least one .txt/.jsonl file."""
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise ConfigError(f"tokenizer.input: {pat!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.suffix not in (".txt", ".jsonl"):
                raise ConfigError(f"tokenizer.input: {p} is neither .txt nor .jsonl")
            if p not in files:
                files.append(p)
    return files


def run(cfg: TokenizerJobConfig) -> dict:
    files = resolve_inputs(cfg.input)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = SentencePieceTokenizer.train(files, cfg.out, cfg.vocab_size, text_field=cfg.text_field,
                                           max_sentence_length=cfg.max_sentence_length, seed=cfg.seed,
                                           exact_vocab=cfg.exact_vocab, model_max_length=cfg.model_max_length)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return {"out": str(cfg.out), "files": len(files), "vocab_size": tok.vocab_size,
            "requested_vocab_size": cfg.vocab_size, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    return run_job("tokenizer", __doc__, argv, TokenizerJobConfig, run, errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
