"""GGUF import: a llama.cpp ``llama`` GGUF file → our HF Llama directory, dequantised to float32.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2-hf")

What happens:
1. ``llama.*`` metadata → ModelArgs (shape, RoPE base, norm epsilon, context length; tied when there is no
   ``output.weight`` tensor).
2. Every tensor is dequantised with ``gguf.quants.dequantize`` (the same routine transformers' ``gguf_file=`` loader
   uses, so both see identical float32 weights) and reshaped to the PyTorch (out, in) layout — GGUF lists dimensions
   innermost first, so the shape is reversed.
3. llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of Q and K so its interleaved ("GPT-J") RoPE sees the
   pairs HF's rotate-half RoPE uses; we undo that permutation per head (the inverse transformers applies in
   ``LlamaTensorProcessor._reverse_permute_weights``).
4. The GPT-2-style BPE tokenizer and the chat template live in the GGUF metadata; transformers rebuilds them
   (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``) and ``save_pretrained`` writes them next to the weights.
5. ``model.hf.save_hf`` writes the directory (atomically).

Not supported (clear CheckpointError): other architectures, GGUFs with a ``rope_freqs`` tensor (Llama 3.1+ RoPE
scaling is stored as precomputed factors there and its parameters cannot be recovered exactly), RoPE scaling types
other than none, and tensor types that ``gguf.quants`` cannot dequantise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.hf import CheckpointError, model_from_state_dict, save_hf
from core.config import ConfigError
from model.llama import ModelArgs

_BLOCK_RENAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_RENAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def our_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` → ``layers.3.attention.wq.weight``; None for a tensor we do not know."""
    if gguf_name in _TOP_RENAMES:
        return _TOP_RENAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_RENAMES:
        return f"layers.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for ``n_heads`` heads (n_kv_heads for K).  # (n_heads·hd, dim)

    convert_hf_to_gguf: ``w.reshape(n_head, 2, hd // 2, dim).swapaxes(1, 2)`` — within each head, row i of the
    first half and row i of the second half become neighbours. The inverse reads rows as (head, hd/2, 2) and swaps
    back to (head, 2, hd/2).
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on short or corrupt files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file: {type(e).__name__}: {e}") from e


def _meta(reader, key: str, path: Path, *, required: bool = True, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise CheckpointError(f"{path}: metadata field {key!r} is missing")
        return default
    try:
        return field.contents()
    except Exception as e:
        raise CheckpointError(f"{path}: metadata field {key!r} cannot be read: {e}") from e


def args_from_gguf(reader, path: Path) -> ModelArgs:
    """``llama.*`` metadata → ModelArgs; CheckpointError naming the file and field otherwise."""
    arch = _meta(reader, "general.architecture", path)
    if arch != "llama":
        raise CheckpointError(f"{path}: metadata field 'general.architecture' is {arch!r}; only 'llama' is supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (Llama 3.1+ RoPE scaling) is not supported")
    scaling = _meta(reader, "llama.rope.scaling.type", path, required=False, default="none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path}: metadata field 'llama.rope.scaling.type' is {scaling!r}; only 'none' is supported")
    dim = int(_meta(reader, "llama.embedding_length", path))
    n_heads = int(_meta(reader, "llama.attention.head_count", path))
    n_kv = int(_meta(reader, "llama.attention.head_count_kv", path, required=False, default=n_heads))
    head_dim = _meta(reader, "llama.attention.key_length", path, required=False,
                     default=_meta(reader, "llama.rope.dimension_count", path, required=False))
    if head_dim is not None and n_heads and int(head_dim) == dim // n_heads and dim % n_heads == 0:
        head_dim = None  # implied: keep ModelArgs in its canonical form
    vocab = _meta(reader, "llama.vocab_size", path, required=False)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{path}: neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens' is present")
        vocab = len(tokens.data)
    try:
        return ModelArgs(
            dim=dim, n_layers=int(_meta(reader, "llama.block_count", path)), n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=None if head_dim is None else int(head_dim),
            intermediate_size=int(_meta(reader, "llama.feed_forward_length", path)), vocab_size=int(vocab),
            norm_eps=float(_meta(reader, "llama.attention.layer_norm_rms_epsilon", path)),
            rope_base=float(_meta(reader, "llama.rope.freq_base", path, required=False, default=10000.0)),
            max_seq_len=int(_meta(reader, "llama.context_length", path)),
            tie_embeddings="output.weight" not in names)
    except ConfigError as e:
        raise CheckpointError(f"{path}: llama.* metadata describes no valid model: {e}") from e


def read_gguf_state(reader, args: ModelArgs, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to float32 under our names, Q/K unpermuted, checked against ``args``."""
    from gguf.quants import dequantize

    from model.hf import expected_shapes

    want = expected_shapes(args)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = our_name(t.name)
        if name is None or name not in want:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a llama model with {args.n_layers} layers")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        if shape != want[name]:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {shape}, expected {want[name]} from metadata")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be dequantised: "
                                  f"{e}") from e
        if name.endswith("attention.wq.weight"):
            w = unpermute_qk(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = unpermute_qk(w, args.kv_heads)
        w = np.ascontiguousarray(w)
        state[name] = torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are read-only memmap views
    missing = sorted(set(want) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing tensor for {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return state


def load_gguf_tokenizer(path: Path):
    """The GGUF's tokenizer (with its chat template) as a transformers tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"{path}: transformers cannot build the tokenizer from the GGUF metadata: {e}") from e


def import_gguf(path: str | Path, out_dir: str | Path) -> ModelArgs:
    """Convert a llama GGUF file into an HF Llama directory at ``out_dir`` (float32); returns its ModelArgs."""
    path = Path(path)
    reader = _open(path)
    args = args_from_gguf(reader, path)
    state = read_gguf_state(reader, args, path)
    del reader
    tokenizer = load_gguf_tokenizer(path)
    model = model_from_state_dict(args, state)
    save_hf(model, tokenizer, out_dir)
    return args
