"""Serving benchmark: our Ray Serve deployment vs vLLM's own OpenAI server, same model, same machine, same run.

Runbook::

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/serve.py                    # builds a tiny random checkpoint
    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/serve.py --model DIR --requests 32 --max-tokens 64

For each server in turn (never both at once, so they do not share the CPUs): start it, warm it up, then send
``--requests`` streaming completions at concurrency 1 and at concurrency 8 through the ``openai`` client (greedy,
so both servers generate the same tokens), and record TTFT (request → first content chunk), inter-token latency
(gaps between chunks, one chunk per token) and tokens/s (completion tokens from the usage chunk / wall time).
vLLM's server is ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` crashes with vllm-cpu).
Prints one JSON line: p50/p95 TTFT, p50 ITL and tokens/s per server and concurrency, and the ratios
ours/vLLM (targets: TTFT ≤ 1.2×, throughput ≥ 0.9×). Timing is not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
def build_tiny_checkpoint(out_dir: str | Path, *, seed: int = 0, n_layers: int = 2) -> Path:
    """A random model of the ``tiny`` preset's shape (``n_layers`` blocks, vocabulary 512) exported by ``save_hf``.

    The tokenizer is our SentencePiece BPE (``model/tokenizer.py``) trained on a few KB of generated text; the
    directory is exactly what ``llamaray export`` writes, which vLLM and ``transformers`` read. A different
    ``seed`` gives different weights (and a different hash) with the same tokenizer.
    """
    import warnings

    from model.hf import save_hf
    from model.llama import ModelArgs, build_model
    from model.tokenizer import SentencePieceTokenizer

    out = Path(out_dir)
    rng = random.Random(0)
    words = ("the a cat dog sat on mat ran to park and saw bird sky blue red green big small one two three four "
             "five six seven eight nine ten plus minus is what answer question model llama ray serve token").split()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "."
                                    for _ in range(600)))
        with warnings.catch_warnings():  # "the corpus supports fewer merges than asked": expected at this size
            warnings.simplefilter("ignore")
            tok = SentencePieceTokenizer.train([corpus], vocab_size=512)
    model = build_model(ModelArgs.from_name("tiny", n_layers=n_layers, vocab_size=512), seed=seed)
    return save_hf(model, tok, out)
