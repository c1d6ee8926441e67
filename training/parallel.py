"""FSDP2 applied from outside the model (torchtitan's parallelize shape).

Order: optional activation checkpointing and ``torch.compile`` per block → ``fully_shard`` each block →
``fully_shard`` the root (which picks up embedding, final norm and output head; with tied embeddings the shared
matrix must live in one FSDP unit, so embedding and head are never sharded separately). One
``MixedPrecisionPolicy``: bf16 compute with fp32 gradient reduction on CUDA, fp32 everywhere on CPU (gloo has no
bf16 fast path and CPU bf16 matmuls are slow). ``model/`` never imports torch.distributed: this module does.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def init_process_group_if_needed(device_type: str) -> None:
    """torchrun / Ray Train set the env; the backend follows the device: NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def mixed_precision_policy(device_type: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


AC_MODES = ("none", "full", "selective")
"""Activation checkpointing per transformer block: none; full (keep only the block's input, recompute everything in
backward); selective (keep the outputs of the matmuls and of attention, recompute the cheap elementwise ops —
norms, SwiGLU, RoPE, residual adds — torchtitan's op-level selective AC)."""

_SAVED_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
"""aten ops whose outputs selective AC keeps (the compute-heavy ones); every other op is recomputed."""


@functools.cache
def _selective_policy():
    """The op-level policy of selective AC: keep the outputs of _SAVED_OPS, recompute the rest (built once)."""
    from torch.utils.checkpoint import CheckpointPolicy

    saved = {getattr(torch.ops.aten, name).default for name in _SAVED_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_context():
    """Called by the checkpoint wrapper at every block forward: fresh contexts around the one policy."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy())


def language_model(model: nn.Module) -> nn.Module:
    """The model.llama.Transformer inside ``model``: the model itself, or the ``trunk`` of a model that wraps one
    (model.reward.RewardModel: trunk + scalar head)."""
    return getattr(model, "trunk", model)


def checkpoint_blocks(model: nn.Module, mode: str) -> nn.Module:
    """Wrap each block of ``model``'s language model (``layers``, or ``trunk.layers``) for activation checkpointing
    ``mode`` (AC_MODES) in place; returns the model. Gradients are those of the unwrapped model: only what backward
    keeps vs recomputes changes."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing {mode!r} is not one of {AC_MODES}")
    if mode == "none":
        return model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    layers = language_model(model).layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)
    return model  # DCP's get_state_dict strips the wrapper prefix from parameter names


def apply_fsdp(model: nn.Module, *, device_type: str, mesh=None, compile: bool = False,
               activation_checkpointing: str = "none", reshard_last_block: bool = False) -> nn.Module:
    """Shard ``model`` (a model.llama.Transformer, or a model wrapping one as ``trunk`` such as
    model.reward.RewardModel) in place over ``mesh`` (default: the whole world) and return it: one FSDP unit per
    transformer block, and the root for the rest (embedding, final norm, output head, a reward model's scalar head).

    ``activation_checkpointing`` is one of AC_MODES. ``reshard_last_block=False`` keeps the last block's parameters
    gathered after forward, since backward needs them at once (saves one all-gather per step; torchtitan does the
    same).
    """
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(device_type)
    if compile:  # identical blocks share one graph; leave room in case guards still tell them apart
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 + len(language_model(model).layers))
    layers = language_model(checkpoint_blocks(model, activation_checkpointing)).layers
    for i, block in enumerate(layers):
        if compile:
            # Compile the block's forward only: FSDP2's pre/post-forward hooks stay eager, names stay unchanged.
            block.forward = torch.compile(block.forward, fullgraph=True)
        last = i == len(layers) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not (last and not reshard_last_block))
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    # hidden_states() is a second entry point (the fused loss computes the head itself): give it FSDP's hooks. A
    # reward model has only forward(), which calls its trunk's hidden_states() inside the root's hooks.
    if hasattr(model, "hidden_states"):
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(model, "hidden_states")
    return model


def local_param_count(model: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model) — FSDP2 parameters are DTensors."""
    local = full = 0
    for p in model.parameters():
        full += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, full
