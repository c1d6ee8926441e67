"""Rollout actors: one engine each, K candidates per prompt, new weights between rounds without a restart.

``RolloutActor`` (a Ray actor) owns one engine of ``actors/engines/`` built from an HF-format directory, chosen by
name (``"auto"``, ``"vllm"``, ``"reference"``, or any registered engine) or injected as a class (tests). Engines
take token ids rendered by *our* tokenizer's chat template, so every engine sees exactly the same prompt, and use
their native ``n`` (one prefill per prompt, K samples from the shared prefix).

``RolloutPool`` keeps a fixed set of actors busy with at most ``max_in_flight`` batches each (back-pressure), replaces
an actor that dies and retries its batch, and can push a new checkpoint into the live actors. An explicit pool rather
than Ray Data's ``map_batches(ActorPoolStrategy)``: the actors must outlive one dataset (they are reused across rounds
and get new weights in place), and exactly-once bookkeeping wants to know which batch came back from which submission.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import ray

from actors.engines import Candidate, Engine, EngineHealth, EngineOptions, GenParams, engine_cls

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
            text = self.tokenizer.apply_chat_template(item.messages, add_generation_prompt=True)
            tokens = self.tokenizer.encode(text, bos=True)
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

