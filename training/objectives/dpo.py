"""Direct preference optimisation: sigmoid DPO on chosen/rejected pairs (training/sft_data.PairRows) against
reference log-probs precomputed from the starting weights, plus an optional NLL term on the chosen answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from training.objectives.finetune import FinetuneObjective, answer_logprobs
from training.sft_data import PairRows, collate_pairs, pair_groups


def dpo_batch_loss(model: nn.Module, batch: dict[str, Tensor], beta: float,
                   nll_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO on a batch of B chosen rows followed by B rejected rows with precomputed reference log-probs,
    plus ``nll_weight`` × the chosen answers' mean per-token negative log-likelihood (Llama 3's DPO: 0.2).
    Per pair, not per row: the policy's log-probs are summed per segment of ``doc`` (P chosen then P rejected
    segments; P = B unless the rows are packed) and lined up with ``ref`` (2P,) in the same order."""
    from model.losses import IGNORE, dpo_loss

    labels = batch["labels"]
    logp = answer_logprobs(model, batch["tokens"], labels, batch.get("doc"), batch.get("positions"))  # (2P,)
    ref = batch["ref"]
    b = logp.shape[0] // 2  # P pairs
    s = dpo_loss(logp[:b], logp[b:], ref[:b], ref[b:], beta)
    chosen_rows = labels[:labels.shape[0] // 2]
    chosen_nll = -logp[:b].sum() / (chosen_rows != IGNORE).sum().clamp_min(1)
    loss = s.loss + nll_weight * chosen_nll if nll_weight else s.loss
    pc, pr = logp[:b].detach(), logp[b:].detach()
    return loss, {"dpo_loss": s.loss.detach(), "chosen_nll": chosen_nll.detach(), "reward_margin": s.reward_margin,
                  "reward_accuracy": s.accuracy, "chosen_logp": pc.mean(), "rejected_logp": pr.mean(),
                  "logp_margin": (pc - pr).mean()}


@dataclass
class DpoObjective(FinetuneObjective):
    """DPO: ``dpo_batch_loss`` on PairRows (B chosen rows followed by their B rejected rows, with reference
    log-probs; packed or one pair per row); DPO statistics (reward margin/accuracy, log-probs) next to the loss."""

    name: ClassVar[str] = "dpo"
    rows: ClassVar[type] = PairRows
    """The row source of the rendered parquet files (training/sft_data.py)."""
    columns: ClassVar[tuple[str, ...]] = ("c_inputs", "c_labels", "r_inputs", "r_labels")
    """The rendered pairs' parquet columns (the reference log-probs are added as ref_chosen / ref_rejected)."""
    beta: float = 0.1
    """DPO β."""
    nll_weight: float = 0.0
    """Weight of the chosen answers' per-token NLL added to the loss."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return dpo_batch_loss(model, batch, self.beta, self.nll_weight)

    def report_settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "nll_weight": self.nll_weight}


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, pairs: list[tuple[list[int], ...]], pad_id: int,
                       batch_size: int = 16, pack_len: int = 0) -> tuple[list[float], list[float]]:
    """Sequence log-probs of the chosen and rejected answers under ``model`` (the frozen reference), in pair order;
    ``pack_len`` > 0 scores them in packed rows (PairRows' packing: the same figures, less padding)."""
    model.eval()
    groups = pair_groups(pairs, pack_len)
    out = torch.zeros(2, len(pairs), dtype=torch.float64)
    for start in range(0, len(groups), batch_size):
        chunk = groups[start:start + batch_size]
        b = collate_pairs(pairs, chunk, pad_id, pack_len > 0)
        logp = answer_logprobs(model, b["tokens"], b["labels"], b["doc"], b.get("positions"))  # (2P,)
        order = torch.tensor([j for g in chunk for j in g])
        out[:, order] = logp.double().view(2, -1).cpu()
    return out[0].tolist(), out[1].tolist()
