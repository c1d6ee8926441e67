"""GRPO: group-relative policy gradients with verifiable rewards (DeepSeekMath's GRPO, with the RLOO and "no std"
advantage variants) as an Objective of the one training loop.

A batch holds sampled answers, G per prompt, already scored: jobs/grpo.py's rollout source samples them from the
live policy, turns each group's rewards into advantages (``group_advantages``) and records, per answer token, the
log-probability under the policy that sampled it (``old_logp``) and, with a KL term, under the frozen reference
(``ref_logp``). The loss is the clipped importance-ratio objective over the answer tokens only (prompt and padding
positions carry label IGNORE and never get logits):

    ratio_t = exp(logp_t − old_logp_t)
    loss    = −mean_t min(ratio_t · A, clip(ratio_t, 1 − ε, 1 + ε) · A)  +  β · mean_t KL_t
    KL_t    = exp(ref_t − logp_t) − (ref_t − logp_t) − 1        (the k3 estimator: unbiased, always ≥ 0)

``mean_t`` is over every answer token of the micro-batch (``loss_norm="token"``, DAPO's choice: long answers weigh
by their length) or the mean of each answer's token mean (``"sequence"``, the GRPO paper's). With one update per
rollout batch ``old_logp`` equals the current log-probs, the ratio is 1 and the loss is the plain policy gradient
A · ∇logp; several updates per batch (``jobs/grpo.py``'s ``updates_per_batch``) are where clipping acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.objectives.finetune import FinetuneObjective, answer_logits

AdvantageMode = Literal["group", "no_std", "loo"]
LossNorm = Literal["token", "sequence"]
ADVANTAGE_MODES: tuple[str, ...] = ("group", "no_std", "loo")
LOSS_NORMS: tuple[str, ...] = ("token", "sequence")


def group_advantages(rewards: Tensor, mode: AdvantageMode = "group", eps: float = 1e-6) -> Tensor:
    """(P, G) rewards, G answers per prompt → (P, G) advantages.

    group: (r − mean) / (std + eps), the GRPO paper's (std over the group, unbiased=False);
    no_std: r − mean (Dr. GRPO: no division, so easy and hard prompts are not re-weighted);
    loo: r − mean of the other G − 1 answers (RLOO's leave-one-out baseline) = G/(G−1) · (r − mean).
    A group whose rewards are all equal gets advantage 0 in every mode: it carries no signal."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, G) with G >= 2, got shape {tuple(rewards.shape)}")
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)
    if mode == "group":
        adv = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif mode == "no_std":
        adv = centred
    elif mode == "loo":
        g = r.shape[1]
        adv = centred * g / (g - 1)
    else:
        raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    return adv.to(rewards.dtype)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate from the sampled tokens' log-probs: exp(d) − d − 1 with d = ref − logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_objective(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """Per-token (−min(ratio · A, clip(ratio) · A), 1.0 where the clipped term was taken and differs) for tokens
    with log-probs ``logp`` (grad), ``old_logp`` and their answer's advantage ``adv`` (all (N,))."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def token_mean(values: Tensor, seq: Tensor, num_seqs: int, norm: LossNorm) -> Tensor:
    """Mean of per-token ``values`` (N,): over all tokens ("token"), or of each sequence's mean ("sequence"; ``seq``
    (N,) is each token's sequence index in 0 … num_seqs − 1; sequences without tokens are left out)."""
    if values.numel() == 0:  # a micro-batch of empty answers: nothing to average, no gradient
        return values.sum()
    if norm == "token":
        return values.mean()
    sums = torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq, values)
    counts = torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq, torch.ones_like(values))
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def answer_logprobs_and_entropy(model: nn.Module, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log p(label) (N,), the policy's entropy at those positions (N,), the (B, T) mask of labelled positions).
    The output head runs on the labelled positions only (``answer_logits``)."""
    logits, keep = answer_logits(model, tokens, labels)
    logp_all = F.log_softmax(logits, dim=-1)  # (N, V)
    logp = logp_all.gather(1, labels[keep][:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, keep


def grpo_loss(model: nn.Module, batch: dict[str, Tensor], *, clip_eps: float, kl_coef: float,
              loss_norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of one micro-batch: ``tokens``/``labels`` (B, T), ``adv`` (B,), ``old_logp`` and, when
    ``kl_coef`` > 0, ``ref_logp`` (N,) for its N labelled positions in row-major order. Statistics: the policy
    term, KL, clip fraction, entropy (all over answer tokens), and the batch's rollout figures (``stat_*`` entries,
    constant over the batch, passed through so they reach the metrics row)."""
    logp, entropy, keep = answer_logprobs_and_entropy(model, batch["tokens"], batch["labels"])
    seq = keep.nonzero()[:, 0]  # each token's row
    adv = batch["adv"].to(logp.dtype)[seq]
    policy, clipped = clipped_objective(logp, batch["old_logp"].to(logp.dtype), adv, clip_eps)
    n = batch["tokens"].shape[0]
    loss = token_mean(policy, seq, n, loss_norm)
    stats = {"policy_loss": loss.detach(), "clip_frac": clipped.mean(), "entropy": entropy.detach().mean()}
    if kl_coef > 0:
        kl = token_mean(k3_kl(logp, batch["ref_logp"].to(logp.dtype)), seq, n, loss_norm)
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    stats.update({k[len("stat_"):]: v for k, v in batch.items() if k.startswith("stat_")})
    return loss, stats


@dataclass
class GrpoObjective(FinetuneObjective):
    """GRPO on rollout batches (jobs/grpo.py's source): ``grpo_loss``; starting weights, LoRA and the merged export
    as in SFT/DPO (FinetuneObjective)."""

    name: ClassVar[str] = "grpo"
    clip_eps: float = 0.2
    """ε of the clipped ratio."""
    kl_coef: float = 0.0
    """β of the KL term to the frozen reference (0: no term, no reference log-probs computed)."""
    loss_norm: LossNorm = "token"
    """token: mean over all answer tokens; sequence: mean of each answer's token mean."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(model, batch, clip_eps=self.clip_eps, kl_coef=self.kl_coef, loss_norm=self.loss_norm)

    def report_settings(self) -> dict[str, float | str]:
        return {"clip_eps": self.clip_eps, "kl_coef": self.kl_coef, "loss_norm": self.loss_norm}
