"""Scorers: turn (prompt, candidate, reference) into a score, chosen per prompt source in the config.

Verifiers (``actors/verifiers.py``) are cheap and run in the driver, serially, as each rollout batch comes back
(``score_with_verifier``); the reward model and the policy log-likelihood scorer hold a model, so they live in
actors (``ScorerActor``) that load it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ray

from actors.verifiers import CodeVerifier, MatchVerifier, NumericVerifier, Verdict
from core.config import ConfigError

ScorerKind = Literal["numeric", "exact", "regex", "code", "reward_model", "logprob"]


@dataclass(frozen=True)
class ScorerConfig:
    """Which scorer judges a prompt source's candidates."""

    kind: ScorerKind = "numeric"
    """numeric | exact | regex | code (verifiers) | reward_model | logprob (model-based)."""
    model: str = ""
    """HF directory of the reward model (kind=reward_model) or the policy (kind=logprob)."""
    check_work: bool = True
    """numeric: also require every written calculation (``a + b = c``) in the answer to hold, so a right number
    reached by wrong work is not kept as SFT data (measured: without it, ~40 % of accepted one-digit sums from a
    weak tiny policy carried wrong work, and a round of SFT on them lowered held-out accuracy)."""
    time_limit_s: float = 5.0
    """Per-candidate wall-clock limit of the code sandbox."""
    memory_mb: int = 512
    """Address-space limit of the code sandbox."""

    def __post_init__(self) -> None:
        if self.kind in ("reward_model", "logprob") and not self.model:
            raise ConfigError(f"scorer kind {self.kind!r} needs scorer.model (an HF directory)")
        if self.time_limit_s <= 0 or self.memory_mb < 64:
            raise ConfigError(f"scorer: time_limit_s must be > 0 and memory_mb ≥ 64, got {self}")

    @property
    def is_verifier(self) -> bool:
        return self.kind in ("numeric", "exact", "regex", "code")

    def verifier(self):
        return {"numeric": NumericVerifier(check_work=self.check_work), "exact": MatchVerifier(),
                "regex": MatchVerifier(regex=True),
                "code": CodeVerifier(time_limit_s=self.time_limit_s, memory_mb=self.memory_mb)}[self.kind]


def score_with_verifier(cfg: ScorerConfig, answers: list[str], reference: str) -> list[Verdict]:
    """Score candidates; a verifier that raises becomes a failed verdict naming the exception."""
    verify = cfg.verifier()
    out = []
    for a in answers:
        try:
            out.append(verify(a, reference))
        except Exception as e:  # noqa: BLE001 — a crashing verifier must not stop the job
            out.append(Verdict(0.0, False, f"verifier crashed: {type(e).__name__}: {e}", cfg.kind))
    return out


class ModelScorer:
    """Reward model (scalar head) or policy length-normalised log-likelihood; runs as a Ray actor."""

    def __init__(self, cfg: ScorerConfig):
        import torch

        from model.hf import load_hf
        from model.tokenizer import load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model)
        if cfg.kind == "reward_model":
            from model.reward import load_reward_model
            self.model = load_reward_model(cfg.model)
        else:
            self.model, _ = load_hf(cfg.model)
        self.model.eval()
        torch.set_grad_enabled(False)

    def score(self, items: list[tuple[list[dict], list[str]]]) -> list[list[Verdict]]:
        from model.reward import mean_logprob, pad_batch, reward_tokens

        out = []
        for messages, answers in items:
            prompt = self.tokenizer.encode(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True), bos=True)
            if self.cfg.kind == "logprob":
                scores = [mean_logprob(self.model, prompt, self.tokenizer.encode(a)) for a in answers]
            else:
                tokens, lengths = pad_batch([reward_tokens(self.tokenizer, messages, a) for a in answers],
                                            self.tokenizer.pad_id)
                scores = self.model(tokens, lengths).tolist()
            out.append([Verdict(float(s), True, "scored", self.cfg.kind) for s in scores])
        return out


ScorerActor = ray.remote(ModelScorer)
