"""Settings of the Serve deployment: what each replica needs (``LLMConfig``) and how many run (``ScalingConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from actors.engines import EngineOptions
from core.config import ConfigError


@dataclass(frozen=True)
class LLMConfig:
    """What a replica needs besides the model directory."""

    engine: str = "auto"
    """A registered engine (``vllm``: AsyncLLM, ``reference``: the PyTorch sampler, …), or ``auto``: vLLM when
    importable, else the reference engine."""
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    """Engine settings (context length, dtype, KV cache size, …); ones the engine cannot honour are refused."""
    api_key: str | None = None
    """When set, /v1/* requires ``Authorization: Bearer <api_key>`` (401 otherwise). Prefer the environment
    variable LLAMARAY_API_KEY to writing it in a file."""
    max_n: int = 8
    """Largest ``n`` (choices per prompt) accepted."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    max_prompts: int = 16
    """Most prompts in one /v1/completions request."""
    drain_timeout_s: float = 600.0
    """After a promote, how long the old engine waits for its running streams before it is shut down anyway."""
    stream_interval_ms: float = 25.0
    """Streaming: after the first token (sent at once), deltas that arrive within this window go out in one HTTP
    write (one server-sent event each). Fewer writes through Serve's proxy keep throughput up under load, at the
    cost of burstier inter-token timing; 0 sends each delta as soon as it exists (Ray LLM batches similarly)."""

    def __post_init__(self) -> None:
        if isinstance(self.engine_options, dict):
            object.__setattr__(self, "engine_options", EngineOptions(**self.engine_options))
        if not isinstance(self.engine, str) or not self.engine:
            raise ConfigError(f"llm.engine must be an engine name, got {self.engine!r}")
        if self.max_n < 1 or self.max_body_bytes < 1024 or self.max_prompts < 1:
            raise ConfigError(f"llm: need max_n >= 1, max_body_bytes >= 1024, max_prompts >= 1; got {self.max_n}, "
                             f"{self.max_body_bytes}, {self.max_prompts}")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise ConfigError(f"llm.stream_interval_ms must be in [0, 1000], got {self.stream_interval_ms}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ConfigError("llm.api_key must be at least 8 characters (or unset)")


@dataclass(frozen=True)
class ScalingConfig:
    """Replica count, autoscaling and back-pressure of the deployment."""

    min_replicas: int = 1
    """Fewest replicas (autoscaling lower bound)."""
    max_replicas: int = 1
    """Most replicas; equal to min_replicas means a fixed size and no autoscaling."""
    signal: Literal["ongoing_requests", "engine_load"] = "ongoing_requests"
    """What autoscaling measures. ``ongoing_requests``: Serve's own signal, requests in flight per replica (aimed
    at ``target_ongoing_requests``), blind to how long each one is. ``engine_load``: tokens of work each replica's
    engine holds — prompts not yet prefilled plus the tokens every request may still generate (``max_tokens``
    minus those generated) — reported by the replicas, with requests still queued in Serve counted at the
    replicas' mean tokens per request; aimed at ``target_engine_load`` (``actors/serve_autoscale.py``)."""
    target_ongoing_requests: float = 4.0
    """signal ``ongoing_requests``: autoscaling aims at this many in-flight requests per replica."""
    target_engine_load: float = 2048.0
    """signal ``engine_load``: autoscaling aims at this many tokens of pending work per replica. Size it as the
    tokens a replica gets through in the latency you accept, e.g. its decode tokens/s × a few seconds."""
    upscale_delay_s: float = 10.0
    """How long demand must stay high before a replica is added."""
    downscale_delay_s: float = 60.0
    """How long demand must stay low before a replica is removed."""
    metrics_interval_s: float = 1.0
    """How often replicas report load to the autoscaler (look-back window is 3× this)."""
    max_ongoing_requests: int = 16
    """Requests one replica runs at once (vLLM batches them); more wait in the queue."""
    max_queued_requests: int = 32
    """Requests allowed to wait for a replica; beyond that the answer is immediate 503 (or 429)."""
    overload_status: int = 503
    """Status of a request turned away by back-pressure: 503 or 429."""
    retry_after_s: float | None = 1.0
    """Retry-After header on back-pressure and no-replica answers (None: no header)."""
    no_replica_timeout_s: float | None = 1.0
    """How long requests wait while the deployment has no running replica (the only one died and its
    replacement is still loading its engine) before they are answered 503 with Retry-After; once that long
    without a replica, new requests get the 503 at once, until a replica runs again. Requests queued behind busy
    replicas are not affected (``max_queued_requests`` bounds those). None: Serve's own behaviour, requests wait
    for a replica however long it takes (up to the proxy's ``request_timeout_s``)."""
    num_cpus: float = 1.0
    """CPUs reserved per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (vLLM with tensor_parallel_size > 1 needs that many)."""
    max_surge_percent: int = 25
    """Rolling update (``llamaray promote``): extra replicas Serve may start, as a percentage of the replica count
    rounded up to whole replicas (25: one extra for up to 4 replicas). Old replicas keep serving until their
    replacements run, so a promote never leaves the deployment without a replica; the extra replicas need room
    (a GPU each on a GPU cluster; without it the promote waits). 0: Serve stops old replicas before starting new
    ones, and requests meanwhile get 503 + Retry-After (``no_replica_timeout_s``)."""
    graceful_shutdown_timeout_s: float = 60.0
    """How long a replica being stopped may finish its running requests."""
    health_check_period_s: float = 5.0
    """How often Serve asks each replica's engine whether it is alive."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"scaling: need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, "
                             f"{self.max_replicas}")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1 or self.max_queued_requests < 0:
            raise ConfigError("scaling: target_ongoing_requests must be > 0, max_ongoing_requests >= 1, "
                             "max_queued_requests >= 0")
        if self.signal not in ("ongoing_requests", "engine_load"):
            raise ConfigError(f"scaling.signal must be ongoing_requests or engine_load, got {self.signal!r}")
        if not self.target_engine_load > 0:
            raise ConfigError(f"scaling.target_engine_load must be > 0, got {self.target_engine_load}")
        if self.overload_status not in (503, 429):
            raise ConfigError(f"scaling.overload_status must be 503 or 429, got {self.overload_status}")
        if min(self.upscale_delay_s, self.downscale_delay_s) < 0 or self.metrics_interval_s <= 0:
            raise ConfigError("scaling: delays must be >= 0 and metrics_interval_s > 0")
        if self.no_replica_timeout_s is not None and not self.no_replica_timeout_s >= 0:
            raise ConfigError(f"scaling.no_replica_timeout_s must be >= 0 or null, got {self.no_replica_timeout_s}")
        if not 0 <= self.max_surge_percent <= 100:
            raise ConfigError(f"scaling.max_surge_percent must be in [0, 100], got {self.max_surge_percent}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("scaling: num_cpus and num_gpus must be >= 0")
