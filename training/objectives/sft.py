"""Supervised fine-tuning: cross-entropy on the assistant tokens of rendered chats (training/sft_data.SftRows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from training.objectives.finetune import FinetuneObjective, answer_token_logprobs
from training.sft_data import SftRows


def sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy over the assistant tokens of the micro-batch; equal to
    ``next_token_loss(model(tokens), labels)`` without the full logits."""
    token_logp, _ = answer_token_logprobs(model, batch["tokens"], batch["labels"], batch.get("doc"),
                                          batch.get("positions"))
    return -token_logp.mean(), {}


@dataclass
class SftObjective(FinetuneObjective):
    """SFT: ``sft_loss`` on SftRows ({inputs, labels} parquet rows, packed or one conversation per row)."""

    name: ClassVar[str] = "sft"
    rows: ClassVar[type] = SftRows
    """The row source of the rendered parquet files (training/sft_data.py)."""
    columns: ClassVar[tuple[str, ...]] = ("inputs", "labels")
    """The rendered rows' parquet columns."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return sft_loss(model, batch)
