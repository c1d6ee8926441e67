"""Autoscaling signals side by side: Serve's ongoing-requests target vs the ``engine_load`` (tokens) signal.

Runbook::

    .venv/bin/python bench/serve_autoscale.py                     # ≈ 5 min here: 2 rounds × 2 signals
    .venv/bin/python bench/serve_autoscale.py --rounds 3 --burst-s 40 --clients 3 --max-tokens 160

One local Ray and Serve, the reference engine on a tiny random checkpoint (2 cores cannot host several vLLM
replicas; what is measured — when Serve adds and removes a replica, and what clients see meanwhile — is the
deployment's, whatever the engine). Rounds alternate the two signals, each on a fresh application (min 1, max 2
replicas, upscale delay ``--upscale-delay-s``, downscale delay ``--downscale-delay-s``, metrics every 0.5 s):

* ``ongoing_requests``: ``target_ongoing_requests`` = ``--target-requests`` (4, our default);
* ``engine_load``: ``target_engine_load`` = the same target in tokens: ``--target-requests`` × ``--typical-tokens``
  (4 × 64 = 256 tokens of pending work per replica), i.e. both are tuned for a typical 64-token request.

The burst: ``--clients`` clients each send streaming completions of ``--max-tokens`` tokens back to back for
``--burst-s`` seconds (``openai`` client, greedy) — long requests, as chat answers are, fewer than the
request target. Per round: seconds from burst start to a second replica RUNNING (null: never), TTFT p50/p95 of the
burst's requests (request → first content chunk), requests completed, and seconds from the burst's end to one
replica again (scale-down, downscale delay included). Prints one JSON line with the medians over rounds.
Timing is not part of the test suite.

Measured 2026-12-07 on the 2-core CPU dev box (load average 27 from another test suite), medians of 2 rounds
(bench/README.md): ongoing_requests never added a replica (TTFT p50 1.31 s, p95 1.70 s); engine_load had the second
replica RUNNING 15.9 s after the burst began (TTFT p50 0.98 s, p95 2.45 s) and was back to one 7.1 s after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIGNALS = ("ongoing_requests", "engine_load")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds per signal (alternating)")
    p.add_argument("--burst-s", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--target-requests", type=float, default=4.0)
    p.add_argument("--typical-tokens", type=int, default=64)
    p.add_argument("--upscale-delay-s", type=float, default=2.0)
    p.add_argument("--downscale-delay-s", type=float, default=5.0)
    p.add_argument("--port", type=int, default=8123)
    return p.parse_args(argv)


def running_replicas(app: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or "LLMServer" not in st.deployments:
        return 0
    return st.deployments["LLMServer"].replica_states.get("RUNNING", 0)


class ReplicaWatch:
    """Polls the application's RUNNING replica count; records when it first reached 2 and last returned to 1."""

    def __init__(self, app: str):
        self.app, self.stop = app, threading.Event()
        self.t_two: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.t_two is None and running_replicas(self.app) >= 2:
                self.t_two = time.monotonic()
            time.sleep(0.25)

    def wait_for_one(self, timeout_s: float) -> float | None:
        """Seconds until the application is back to exactly one RUNNING replica (None: not within timeout_s)."""
        from ray import serve

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            states = dict(serve.status().applications[self.app].deployments["LLMServer"].replica_states)
            if states == {"RUNNING": 1}:
                return time.monotonic() - t0
            time.sleep(0.25)
        return None


def burst(url: str, app: str, args: argparse.Namespace) -> list[float]:
    """``args.clients`` clients sending streaming completions back to back for ``args.burst_s``; their TTFTs."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=5, timeout=300)
    ttfts: list[float] = []
    end = time.monotonic() + args.burst_s

    def one_client(i: int) -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            first = None
            for chunk in client.completions.create(model=app, prompt=f"the cat {i}", max_tokens=args.max_tokens,
                                                   temperature=0, stream=True):
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - t0
            if first is not None:
                ttfts.append(first)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ttfts


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def one_round(base, signal: str, name: str, args: argparse.Namespace) -> dict:
    import dataclasses

    from jobs.serve import deploy, undeploy

    scaling = dataclasses.replace(base.scaling, signal=signal)
    cfg = dataclasses.replace(base, app_name=name, route_prefix=f"/{name}", scaling=scaling)
    url = deploy(cfg)
    try:
        watch = ReplicaWatch(name)
        t0 = time.monotonic()
        ttfts = burst(url, name, args)
        down_s = watch.wait_for_one(timeout_s=90)  # from the burst's end
        watch.stop.set()
        return {"to_second_replica_s": None if watch.t_two is None else round(watch.t_two - t0, 2),
                "ttft_p50_s": round(pct(ttfts, 0.5), 3), "ttft_p95_s": round(pct(ttfts, 0.95), 3),
                "requests": len(ttfts), "scale_down_s": None if watch.t_two is None or down_s is None
                else round(down_s, 2)}
    finally:
        undeploy(name)


def median_of(rounds: list[dict], key: str) -> float | None:
    xs = [r[key] for r in rounds if r[key] is not None]
    return round(statistics.median(xs), 3) if xs else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray

    from actors.engines import EngineOptions
    from actors.serve_config import LLMConfig, ScalingConfig
    from bench.serve import build_tiny_checkpoint
    from jobs.serve import ServeJobConfig

    loadavg = os.getloadavg()[0]
    model = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="autoscale-")) / "ckpt", n_layers=4)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    base = ServeJobConfig(
        model=str(model), port=args.port, request_timeout_s=300,
        llm=LLMConfig(engine="reference", engine_options=EngineOptions(num_threads=1)),
        scaling=ScalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=args.target_requests,
                              target_engine_load=args.target_requests * args.typical_tokens,
                              upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
                              metrics_interval_s=0.5, max_ongoing_requests=16, num_cpus=1,
                              graceful_shutdown_timeout_s=5.0))
    results: dict[str, list[dict]] = {s: [] for s in SIGNALS}
    try:
        for r in range(args.rounds):
            for signal in SIGNALS:
                results[signal].append(one_round(base, signal, f"{signal.replace('_', '')}{r}", args))
                print(f"[bench] round {r} {signal}: {results[signal][-1]}", file=sys.stderr, flush=True)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    keys = ("to_second_replica_s", "ttft_p50_s", "ttft_p95_s", "requests", "scale_down_s")
    print(json.dumps({
        "bench": "serve_autoscale",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_1min_at_start": round(loadavg, 2)},
        "engine": "reference", "model": "tiny random, 4 layers", "rounds": args.rounds, "statistic": "median",
        "workload": {"clients": args.clients, "max_tokens": args.max_tokens, "burst_s": args.burst_s,
                     "target_ongoing_requests": args.target_requests,
                     "target_engine_load": args.target_requests * args.typical_tokens,
                     "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s},
        **{s: {k: median_of(results[s], k) for k in keys} for s in SIGNALS},
        "per_round": results,
    }))


if __name__ == "__main__":
    main()
