"""Held-out evaluation: greedy answers to held-out prompts, scored by the task's verifier — one function for every job.

Who produces the answers is the only thing that differs, so it is passed in as an ``Answerer`` (chat prompts → one
greedy answer text each): the reference sampler on an in-memory model (SFT's ``val_task_accuracy``, the pipeline's
per-stage summary) or a rollout pool of engines (rs-rounds, on whichever engine the pool runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]
Answerer = Callable[[Sequence[Messages]], list[str]]
"""Greedy answer text for each chat prompt, in order (the generation prompt for the assistant is appended)."""

METRICS = ("numeric", "exact")


def prompt_chat(row: dict) -> Messages:
    """The chat of a prompt-file row (tasks/arithmetic.py's, RS prompt sources): its ``messages``, or its ``prompt``
    as one user turn."""
    return row.get("messages") or [{"role": "user", "content": str(row.get("prompt", ""))}]


@dataclass(frozen=True)
class HeldOut:
    """Held-out chat prompts and the reference answer of each."""

    messages: list[Messages]
    references: list[str]

    def __post_init__(self) -> None:
        if len(self.messages) != len(self.references):
            raise ValueError(f"{len(self.messages)} prompts but {len(self.references)} references")

    @classmethod
    def read(cls, path: str | Path, size: int | None = None) -> HeldOut:
        """The first ``size`` rows (all when None) of a JSONL prompt file: each row has ``reference`` and either
        ``messages`` or ``prompt`` (one user turn), as tasks/arithmetic.py writes them. Errors name file and line."""
        from core.config import ConfigError
        from core.files import read_jsonl

        messages, refs = [], []
        for ln, row in read_jsonl(path):
            if size is not None and len(refs) >= size:
                break
            if not isinstance(row, dict) or "reference" not in row or not ("messages" in row or "prompt" in row):
                raise ConfigError(f"{path}:{ln}: a held-out row needs `reference` and `messages` or `prompt`")
            messages.append(prompt_chat(row))
            refs.append(str(row["reference"]))
        return cls(messages, refs)


@dataclass(frozen=True)
class Score:
    """What ``greedy_accuracy`` measured: the fraction of answers the verifier passed, and the answers."""

    accuracy: float
    answers: list[str]


def verifier(metric: str) -> Callable[[str, str], Any]:
    """The verifier a metric names: ``numeric`` (final number, tolerant) or ``exact`` (normalised text match)."""
    from actors.verifiers import MatchVerifier, NumericVerifier

    if metric not in METRICS:
        raise ValueError(f"unknown task metric {metric!r}; choose one of {METRICS}")
    return NumericVerifier() if metric == "numeric" else MatchVerifier()


def greedy_accuracy(answer: Answerer, heldout: HeldOut, metric: str = "numeric") -> Score:
    """Ask ``answer`` for one greedy answer per held-out prompt and score them with ``metric``'s verifier."""
    check = verifier(metric)
    answers = [a or "" for a in answer(heldout.messages)]
    if len(answers) != len(heldout.references):
        raise RuntimeError(f"the answerer returned {len(answers)} answers for {len(heldout.references)} prompts")
    passed = sum(check(a, r).passed for a, r in zip(answers, heldout.references))
    return Score(passed / max(len(answers), 1), answers)


def sampler_answerer(model: Any, tok: Any, max_new_tokens: int) -> Answerer:
    """Greedy answers from an in-memory ``model.llama.Transformer`` with the reference sampler (no Ray, no engine),
    stopping at the tokenizer's end-of-turn ids."""
    import torch

    from model.sampler import SamplingParams, generate

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=tuple(getattr(tok, "stop_ids", None) or [tok.eos_id]))

    def answer(prompts: Sequence[Messages]) -> list[str]:
        ids = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True), bos=True) for m in prompts]
        with torch.no_grad():
            outs = generate(model.eval(), ids, params, tokenizer=tok)
        return [o[0].text or "" for o in outs]

    return answer
