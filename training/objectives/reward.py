"""Reward-model training: the Bradley–Terry loss −log σ(r_c − r_r) (model/reward.pairwise_loss) on chosen/rejected
pairs (training/sft_data.PairRows, the rows DPO trains on), with model.reward.RewardModel — the starting weights'
trunk plus a scalar head read at each row's last real token — exported with ``save_reward_model`` so that
``load_reward_model`` and the ``reward_model`` scorer (actors/scorers.py) read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from model.llama import ModelArgs
from training.loop import TrainConfig, Worker
from training.objectives.dpo import DpoObjective
from training.objectives.finetune import FinetuneObjective
from training.sft_data import PairRows


def row_lengths(labels: Tensor) -> Tensor:
    """(B, T) labels → (B,) lengths up to and including each row's last labelled position.

    A rendered row ends with its answer (training/sft_data.render_answer), so this is the row's real length without
    the right padding, and the reward is read at the row's last input token (the rendered chat without its final
    token) — the same token the ``reward_model`` scorer reads (model.reward.reward_tokens)."""
    from model.losses import IGNORE

    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE, positions, -1).amax(dim=1) + 1


def reward_batch_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley–Terry loss on B chosen rows followed by their B rejected rows; statistics: pair accuracy (share of
    pairs with r_c > r_r; ties count as wrong), reward margin and mean chosen / rejected reward."""
    from model.reward import pairwise_loss

    rewards = model(batch["tokens"], row_lengths(batch["labels"]))  # (2B,)
    b = rewards.shape[0] // 2
    loss, accuracy = pairwise_loss(rewards[:b], rewards[b:])
    chosen, rejected = rewards[:b].detach(), rewards[b:].detach()
    return loss, {"pair_accuracy": accuracy, "reward_margin": (chosen - rejected).mean(),
                  "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}


@dataclass
class RewardObjective(FinetuneObjective):
    """A reward model on preference pairs: ``RewardModel.from_policy(starting weights)`` (fresh weights without
    ``init_dir``), ``reward_batch_loss``, export with ``save_reward_model`` to ``spec.export_dir``. Full fine-tuning
    only (``lora`` must be None); no task metric (validation reports ``val_pair_accuracy`` and the other stats)."""

    name: ClassVar[str] = "rm"
    rows: ClassVar[type] = PairRows
    """The row source of the rendered parquet files (the pairs DPO renders, without reference log-probs)."""
    columns: ClassVar[tuple[str, ...]] = DpoObjective.columns
    """The rendered pairs' parquet columns."""

    def __post_init__(self) -> None:
        if self.lora is not None:
            raise ValueError("a reward model is trained in full: LoRA is not supported (lora must be None)")

    def build_model(self, args: ModelArgs, train: TrainConfig) -> nn.Module:
        from model.reward import RewardModel

        return RewardModel.from_policy(super().build_model(args, train))

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return reward_batch_loss(model, batch)

    def export(self, model: nn.Module, w: Worker) -> None:
        """Collective: rank 0 gathers the full weights and writes them with ``save_reward_model`` (an HF Llama
        directory for the trunk + ``reward_head.safetensors``, and the tokenizer)."""
        from model.reward import RewardModel, save_reward_model
        from training.checkpointing import gather_full_state

        if not w.spec.export_dir:
            return
        full = gather_full_state(model, rank=w.rank)
        if full is None:
            return
        rm = RewardModel(w.spec.model_args)
        rm.load_state_dict(full, strict=True)
        save_reward_model(rm.eval(), w.tok, w.spec.export_dir)
