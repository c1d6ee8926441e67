"""Pretraining: next-token prediction on packed (B, T+1) token rows from seeded fresh weights; exports an HF
directory. The loss is ``causal_lm_loss``, or on GPU ``fused_lm_loss`` (head + cross-entropy compiled together)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.llama import ModelArgs
from training.loop import TrainConfig, Worker


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a (B, T+1) batch of token rows."""
    logits = model(batch[:, :-1])  # (B, T, V) float32
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def _head_ce(h: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    logits = h @ w.t()  # (B, T, V) in the compute dtype (bf16 on GPU)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


_head_ce_compiled = None


def fused_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The same loss as causal_lm_loss, with the output head + cross-entropy compiled together on CUDA, so the
    (B, T, V) float32 logits of Transformer.forward are never materialised (vocab 128k: 8 GB at 8 × 2048).

    Needs the root's parameters still gathered after ``hidden_states`` (training/parallel.apply_fsdp registers that
    method with FSDP and keeps the root unsharded after forward)."""
    global _head_ce_compiled
    h = model.hidden_states(batch[:, :-1])  # (B, T, dim)
    w = model.output.weight  # (V, dim); the gathered weight while the root is unsharded
    if h.is_cuda:
        if _head_ce_compiled is None:
            _head_ce_compiled = torch.compile(_head_ce)
        return _head_ce_compiled(h, w, batch[:, 1:])
    return _head_ce(h, w, batch[:, 1:])


@dataclass
class PretrainObjective:
    """Next-token prediction on packed (B, T+1) token rows, from seeded fresh weights; exports an HF directory."""

    loss_fn: Callable[[nn.Module, Tensor], Tensor] = causal_lm_loss
    """(model, batch) → scalar mean loss (causal_lm_loss, or fused_lm_loss on GPU)."""
    name: str = "pretrain"
    """Job name."""

    def build_model(self, args: ModelArgs, train: TrainConfig) -> nn.Module:
        from model.llama import build_model

        return build_model(args, device="cpu", seed=train.seed)

    def loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_fn(model, batch), {}

    def tokens(self, batch: Tensor) -> int:
        return batch[:, 1:].numel()

    def real_tokens(self, batch: Tensor) -> int:
        return self.tokens(batch)  # packed token rows: no padding

    def seq_len(self, batch: Tensor) -> int:
        return batch.shape[1] - 1

    def eval_extras(self, model: nn.Module, val: dict[str, float], w: Worker) -> dict[str, float]:
        return {"val_ppl": math.exp(min(val["val_loss"], 50))}

    def export(self, model: nn.Module, w: Worker) -> None:
        if w.spec.export_dir:
            from training.checkpointing import export_hf

            export_hf(model, w.spec.model_args, w.spec.tokenizer_dir, w.spec.export_dir, rank=w.rank)
