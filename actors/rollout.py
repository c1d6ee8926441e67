"""Rollout actors: one engine each, K candidates per prompt, new weights between rounds without a restart.

``RolloutActor`` (a Ray actor) owns one engine of ``actors/engines/`` built from an HF-format directory, chosen by
name (``"auto"``, ``"vllm"``, ``"reference"``, or any registered engine) or injected as a class (tests). Engines
take token ids rendered by *our* tokenizer's chat template, so every engine sees exactly the same prompt, and use
their native ``n`` (one prefill per prompt, K samples from the shared prefix).

``RolloutPool`` keeps a fixed set of actors busy with at most ``max_in_flight`` batches each (back-pressure), replaces
an actor that dies and retries its batch, and can push new weights into the live actors: a checkpoint directory
(``load_weights``) or a trainer's in-memory weights (``update_weights``: one ``ray.put``, every actor reads the same
object; an actor that replaces a dead one gets the latest weights before it takes work). An explicit pool rather
than Ray Data's ``map_batches(ActorPoolStrategy)``: the actors must outlive one dataset (they are reused across rounds
and get new weights in place), and exactly-once bookkeeping wants to know which batch came back from which submission.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

from actors.engines import Candidate, Engine, EngineHealth, EngineOptions, GenParams, engine_cls

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptItem:
    """One prompt to roll out. ``messages`` are chat turns; the generation prompt for the assistant is appended."""

    id: str
    messages: list[dict]


@dataclass(frozen=True)
class RolloutResult:
    """The candidates for one prompt, or why there are none."""

    id: str
    candidates: list[Candidate] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None
    """Set when the prompt could not be rolled out (empty, longer than the context…); the job records a failed row."""


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids every engine gets for a chat prompt: our chat template with the generation prompt, BOS first."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), bos=True)


class RolloutWorker:
    """The actor's body (kept a plain class so it can be tested and benchmarked without Ray): an engine started
    for batches, and our tokenizer to render the chat prompts."""

    def __init__(self, model_dir: str, engine: type, options: EngineOptions | None = None):
        from model.tokenizer import load_tokenizer

        self.engine: Engine = engine(model_dir, options or EngineOptions())
        asyncio.run(self.engine.start())
        self.tokenizer = load_tokenizer(model_dir)

    def generate(self, batch: list[PromptItem], params: GenParams) -> list[RolloutResult]:
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

    def _encode(self, item: PromptItem, params: GenParams) -> tuple[str | None, list[int]]:
        try:
            if not item.messages or not any(str(m.get("content", "")).strip() for m in item.messages):
                return "empty prompt", []
            tokens = prompt_ids(self.tokenizer, item.messages)
        except Exception as e:  # malformed messages: a failed row, never a crashed batch
            return f"bad prompt: {e}", []
        context = self.engine.model_info().max_model_len
        if len(tokens) > context - params.max_tokens:
            return f"prompt of {len(tokens)} tokens leaves no room for {params.max_tokens} new tokens " \
                   f"in a context of {context}", tokens
        return None, tokens

    def health(self) -> EngineHealth:
        return asyncio.run(self.engine.health())

    def load_weights(self, model_dir: str) -> str:
        self.engine.load_weights(model_dir)
        return self.engine.model_info().hash

    def update_weights(self, weights: dict[str, torch.Tensor], version: str) -> float:
        """The engine's ``update_weights``; returns the seconds it took."""
        start = time.perf_counter()
        self.engine.update_weights(weights, version)
        return time.perf_counter() - start

    def pid(self) -> int:
        return os.getpid()


RolloutActor = ray.remote(RolloutWorker)


class RolloutPool:
    """A fixed set of rollout actors, fed with back-pressure; dead actors are replaced and their batch retried."""

    def __init__(self, model_dir: str, *, num_actors: int, engine: str | type = "auto",
                 options: EngineOptions | None = None, actor_options: dict | None = None, max_in_flight: int = 2,
                 max_retries: int = 3):
        """``engine``: a registered name (resolved here, on the driver) or an engine class (tests). Options the
        engine cannot honour are refused here, before any actor starts."""
        if num_actors < 1:
            raise ValueError(f"rollout pool needs at least one actor, got num_actors={num_actors}")
        self.model_dir = model_dir
        self.engine_cls = engine if isinstance(engine, type) else engine_cls(engine)
        self.options = options or EngineOptions()
        self.engine_cls.check_options(self.options)
        self.actor_options = actor_options or {}
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.replaced = 0
        self._pushed: tuple[ray.ObjectRef, str] | None = None  # the latest update_weights: (weights, version)
        self.actors = [self._spawn() for _ in range(num_actors)]
        self._incarnation = [0] * num_actors
        ray.get([a.health.remote() for a in self.actors])  # fail fast if the engine cannot start

    def _spawn(self):
        return RolloutActor.options(**self.actor_options).remote(self.model_dir, self.engine_cls, self.options)

    @property
    def engine_name(self) -> str:
        return self.engine_cls.name

    def map(self, batches: Iterable[list[PromptItem]], params: GenParams) -> Iterator[list[RolloutResult]]:
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

    def _replace(self, slot: int) -> float:
        """A fresh actor in ``slot``, holding the latest pushed weights if any; the seconds it took to load them."""
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:
            pass
        self.actors[slot] = self._spawn()
        self._incarnation[slot] += 1
        self.replaced += 1
        seconds = 0.0
        if self._pushed is not None:  # it starts from model_dir: give it the weights the others sample from
            seconds = ray.get(self.actors[slot].update_weights.remote(*self._pushed))
        ray.get(self.actors[slot].health.remote())
        return seconds

    def load_weights(self, model_dir: str) -> list[str]:
        """Push a new checkpoint into every live actor (next round); returns the hash each reports."""
        self.model_dir = model_dir
        self._pushed = None
        return ray.get([a.load_weights.remote(model_dir) for a in self.actors])

    def update_weights(self, weights: dict[str, torch.Tensor] | ray.ObjectRef, version: str) -> list[float]:
        """Load a trainer's full weights (HF names, CPU tensors: ``model.hf.hf_state_dict``) into every live actor's
        engine in place; returns the seconds each engine took. ``weights`` is ``ray.put`` once here (or passed as the
        ref of an object the caller put) and every actor reads that one object. ``version`` becomes each engine's
        ``model_info().hash`` (e.g. "grpo-step-12").

        The pool keeps the ref until the next update or ``load_weights``, so an actor that replaces a dead one loads
        these weights before it takes work (the object store holds one copy of the weights meanwhile). Bad weights
        (``EngineError`` naming the tensor) are refused by every actor before any copies them, and are not kept. An
        actor that dies meanwhile is replaced (its replacement loads these weights; its seconds are reported)."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        calls = [a.update_weights.remote(ref, version) for a in self.actors]
        previous, self._pushed = self._pushed, (ref, version)
        seconds = []
        try:
            for slot, call in enumerate(calls):
                try:
                    seconds.append(ray.get(call))
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    log.warning("rollout actor %d died during update_weights (%s); replacing it", slot,
                                type(e).__name__)
                    seconds.append(self._replace(slot))
        except BaseException:
            self._pushed = previous  # refused weights are not handed to later replacements
            raise
        return seconds

    def health(self) -> list[EngineHealth]:
        return ray.get([a.health.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

