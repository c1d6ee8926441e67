"""Training objectives on logits, shared by pretraining, SFT and DPO. Labels use -100 for "no loss here"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose label is not IGNORE. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(label) over the non-ignored positions of each row → (B,)."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)


@dataclass
class DpoStats:
    loss: Tensor
    reward_margin: Tensor
    """mean β·[(π_c − ref_c) − (π_r − ref_r)]"""
    accuracy: Tensor
    """share of pairs whose implicit reward prefers the chosen answer"""
    chosen_reward: Tensor
    rejected_reward: Tensor


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> DpoStats:
    """Sigmoid DPO (Rafailov et al., 2023): −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]), inputs are sequence log-probs (B,)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    return DpoStats(loss=-F.logsigmoid(margin).mean(), reward_margin=margin.mean().detach(),
                    accuracy=(margin > 0).float().mean().detach(), chosen_reward=chosen.mean().detach(),
                    rejected_reward=rejected.mean().detach())
