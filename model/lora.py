"""LoRA (Hu et al., 2021) for the LLaMA module, in plain PyTorch.

``add_lora(model, LoraConfig(...))`` replaces the targeted ``nn.Linear`` layers by ``LoraLinear`` in place and freezes
every base parameter, so only the adapters train. ``merge_lora(model)`` folds W + (alpha/r)·B·A back into plain linears
(the HF export then holds ordinary Llama weights that vLLM loads); ``lora_state_dict`` / ``load_lora_state_dict`` move
the adapter alone.

Why not ``peft``: it targets HF module trees and wraps the model in its own classes, which then have to be unwrapped again
before ``fully_shard``; here the adapters are ordinary parameters of each block, so FSDP2 shards them with the block and
the training loop, checkpoints and export need no special case beyond ``requires_grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraConfig:
    """Which linears get a low-rank adapter, and its shape."""

    rank: int = 8
    """Rank r of the update B·A."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    """Linear layer names inside each block (attention: wq wk wv wo; MLP: w1 gate, w3 up, w2 down)."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {list(self.targets)}: unknown {unknown}; choose from {list(TARGETS)}")


class LoraLinear(nn.Module):
    """y = base(x) + (alpha/r) · B(A(dropout(x))), with base frozen and B initialised to zero."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, base.in_features, device=dev, dtype=dt))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=dev, dtype=dt))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=False,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + (self.lora_b @ self.lora_a) * self.scale)
        return out


def _targets(model: nn.Module, cfg: LoraConfig):
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name in cfg.targets:
                if hasattr(parent, name):
                    yield parent, name


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap the targeted linears of every block; freeze everything that is not an adapter. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name in _targets(model, cfg):
        setattr(parent, name, LoraLinear(getattr(parent, name), cfg))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place) and make all parameters trainable again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (``…wq.lora_a`` / ``…wq.lora_b``)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "adapter") -> None:
    """Load adapter tensors into a model that already has ``add_lora`` applied with the same config."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: adapter does not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
