"""Training checkpoints as torch.distributed.checkpoint (DCP) directories, and their HF export.

A checkpoint directory holds the DCP shards of model + optimizer (``*.distcp`` + ``.metadata``) and
``train_state.json`` ({step, consumed, ...}). Every rank writes its shards into a local directory and hands it to
``ray.train.report(checkpoint=…)``; Ray Train registers the checkpoint only after every rank has reported and the
merged directory is persisted, so a half-written checkpoint is never the "latest" one. DCP re-shards on load, so a
run resumes on another number of workers. Nothing here is pickled: DCP tensors + JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILE = "train_state.json"


def save(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any], *,
         rank: int) -> Path:
    """Collective: every rank writes its shards of model and optimizer into ``ckpt_dir``; rank 0 the JSON."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir))
    if rank == 0:
        (ckpt_dir / STATE_FILE).write_text(json.dumps(train_state, indent=2))
    return ckpt_dir


def load(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Collective: load shards (re-sharded to this world size) into model/optimizer; return train_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a llamaray training checkpoint ({STATE_FILE} missing)")
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(ckpt_dir))
        set_model_state_dict(model, model_sd)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(ckpt_dir))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads(state_file.read_text())


def read_train_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def gather_full_state(model: nn.Module, *, rank: int) -> dict[str, torch.Tensor] | None:
    """Collective: the sharded model's full state dict as fp32 CPU tensors on rank 0 (None on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.float() for k, v in full.items()} if rank == 0 else None


def gather_full_model(model: nn.Module, args: Any, *, rank: int, lora: Any = None) -> nn.Module | None:
    """Collective: the full fp32 weights as a plain CPU ``Transformer`` on rank 0 (None on the others); with ``lora``
    (a model.lora.LoraConfig) the adapters are added first, as in the trained model."""
    from model.llama import build_model
    from model.lora import add_lora

    full = gather_full_state(model, rank=rank)
    if full is None:
        return None
    plain = build_model(args, device="cpu", seed=None)
    if lora is not None:
        add_lora(plain, lora)
    plain.load_state_dict(full, strict=True)
    return plain


def export_hf(model: nn.Module, args: Any, tokenizer_dir: str | Path | None, out_dir: str | Path, *,
              rank: int) -> Path | None:
    """Collective: gather the sharded model and write an HF Llama directory (rank 0 writes)."""
    plain = gather_full_model(model, args, rank=rank)
    if plain is None:
        return None
    from model.hf import save_hf

    tok = None
    if tokenizer_dir:
        from model.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer_dir)
    return save_hf(plain, tok, out_dir)


def dcp_to_hf(ckpt_dir: str | Path, args: Any, tokenizer_dir: str | Path | None, out_dir: str | Path) -> Path:
    """Offline (one process, no process group): a training checkpoint → HF directory."""
    import torch.distributed.checkpoint as dcp

    from model.hf import save_hf
    from model.llama import build_model

    model = build_model(args, device="cpu", seed=None)
    sd = model.state_dict()
    dcp.load({"model": sd}, checkpoint_id=str(ckpt_dir))
    model.load_state_dict(sd)
    tok = None
    if tokenizer_dir:
        from model.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer_dir)
    return save_hf(model, tok, out_dir)
