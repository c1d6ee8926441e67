"""Export a checkpoint as a Hugging Face Llama directory (what vLLM, transformers and llama.cpp read).

Runbook::

    # a training run's DCP checkpoint (a directory with .metadata, *.distcp, train_state.json) → HF directory
    llamaray export --set checkpoint=runs/tiny/checkpoint_000010 --set tokenizer=runs/tok --set out=runs/tiny-hf
    # re-export an HF directory in bfloat16 (half the size; what GPU serving wants)
    llamaray export --set checkpoint=runs/tiny-hf --set out=runs/tiny-hf-bf16 --set dtype=bfloat16
    # the same, as `ray job submit` runs it:
    python -m jobs.export --set checkpoint=… --set out=…

Prints one JSON line: output directory, source kind (hf/dcp), dtype, parameter count, seconds.

The input kind is detected: ``config.json`` → HF directory (re-saved through ``model.hf.load_hf``, so it is
validated on the way); ``.metadata`` (+ ``train_state.json`` with the model shape, as ``training/loop.py`` writes
it) → DCP checkpoint, read in this one process with ``training.checkpointing.dcp_to_hf`` (DCP re-shards on load, so any
training world size works). The HF directory's own tokenizer is carried along; a DCP checkpoint holds none, so pass
``tokenizer=DIR`` (otherwise the export has no tokenizer files and vLLM cannot serve it).

What it leaves out: no Ray (one process reads and writes; the whole model must fit in this machine's memory), no
sharded output (one ``model.safetensors``), no GGUF output (use llama.cpp's ``convert_hf_to_gguf.py`` on the result).
The output is written to a temporary sibling and renamed into place, so an existing ``out`` is replaced only by a
complete export.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError, run_job
from core.files import read_json
from model.hf import CheckpointError, check_conversion, load_hf, resolve_dtype, save_hf
from model.llama import ModelArgs


@dataclass
class ExportConfig:
    """Settings of ``llamaray export``."""

    checkpoint: str = ""
    """Directory to export: an HF Llama directory (config.json) or a DCP training checkpoint (.metadata)."""
    out: str = ""
    """Output HF directory (replaced atomically if it exists)."""
    dtype: str | None = None
    """Cast floating weights to float32, bfloat16 or float16; None keeps the checkpoint's dtype (DCP: float32)."""
    tokenizer: str | None = None
    """Tokenizer directory to ship with the export; None uses the HF directory's own (a DCP checkpoint has none)."""

    def __post_init__(self) -> None:
        check_conversion("export", "checkpoint", self.checkpoint, "an HF directory or a DCP checkpoint directory",
                         self.out, self.dtype)


def checkpoint_kind(path: Path) -> str:
    """``"hf"`` or ``"dcp"``; CheckpointError for anything else."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if (path / "config.json").is_file():
        return "hf"
    if (path / ".metadata").is_file():
        return "dcp"
    raise CheckpointError(f"{path}: neither an HF directory (config.json) nor a DCP checkpoint (.metadata)")


def _dcp_model_args(ckpt: Path) -> ModelArgs:
    state_file = ckpt / "train_state.json"
    state = read_json(state_file, CheckpointError,
                      missing="file not found (the model shape of a DCP checkpoint lives there)")
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{state_file}: field 'model' (the ModelArgs of the run) is missing")
    try:
        return ModelArgs.from_dict(state["model"], source=f"{state_file} field 'model'")
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{state_file}: field 'model': {e}") from e


def export(cfg: ExportConfig) -> dict:
    t0 = time.perf_counter()
    src, out = Path(cfg.checkpoint), Path(cfg.out)
    kind = checkpoint_kind(src)
    tokenizer = None
    if cfg.tokenizer:
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    if kind == "hf":
        model, own_tok = load_hf(src)
        save_hf(model, tokenizer or own_tok, out, dtype=cfg.dtype)
    else:
        try:
            from training.checkpointing import dcp_to_hf
        except ImportError as e:
            raise CheckpointError(f"{src}: DCP export lands with pretraining (training/checkpointing.py: {e})") from e
        args = _dcp_model_args(src)
        if cfg.dtype is None:
            dcp_to_hf(src, args, cfg.tokenizer, out)
        else:  # dcp_to_hf writes float32; cast on a second (validated) pass
            with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
                dcp_to_hf(src, args, cfg.tokenizer, Path(tmp) / "fp32")
                model, tok = load_hf(Path(tmp) / "fp32")
                save_hf(model, tok, out, dtype=cfg.dtype)
        model, _ = load_hf(out)  # validate what was written, and count
    n_params = sum(p.numel() for p in model.parameters())
    return {"out": str(out), "source": kind, "dtype": str(resolve_dtype(cfg.dtype) or model.tok_embeddings.weight.dtype
                                                         ).removeprefix("torch."),
            "params": n_params, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    return run_job("export", __doc__, argv, ExportConfig, export, errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
