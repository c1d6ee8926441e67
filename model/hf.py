"""The one checkpoint format: a Hugging Face ``LlamaForCausalLM`` directory.

    out_dir/
      config.json               LlamaConfig fields (hf_config_from_args)
      generation_config.json    bos/eos ids and default sampling settings
      model.safetensors         weights under HF names (lm_head.weight left out when tied)
      tokenizer files           whatever ``tokenizer.save(out_dir)`` writes

transformers, vLLM and llama.cpp's converters read this layout, so ``save_hf`` is how a model leaves llamaray and
``load_hf`` is how one comes in (sharded ``model.safetensors.index.json`` directories too). Our parameter names map
onto HF's by renaming alone: ``model/llama.py`` uses HF's rotate-half RoPE, so no Q/K permutation is needed here
(GGUF files are a different story, see ``model/gguf.py``).

Every problem with a file raises ``CheckpointError`` naming the file and the field or tensor. Weights are read with
safetensors only (no pickle, no ``torch.load``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.config import ConfigError
from model.llama import ModelArgs, RopeScaling, Transformer, rope_frequencies

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Files whose presence means "this directory carries a tokenizer".
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as the model it claims to be; the message names the file and field."""


# ------------------------------------------------------------------------------------------------ names


_LAYER_RENAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RENAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def to_hf_name(name: str) -> str:
    """Our parameter name → the HF Llama name.

    ``layers.3.attention.wq.weight`` → ``model.layers.3.self_attn.q_proj.weight``.
    """
    if name in _TOP_RENAMES:
        return _TOP_RENAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}"
    raise KeyError(f"no HF name for parameter {name!r}")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``args`` must hold, by our parameter name (``output.weight`` only if untied)."""
    d, hd, v, f = args.dim, args.hd, args.vocab_size, args.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d), "norm.weight": (d,)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {p + "attention.wq.weight": (args.n_heads * hd, d), p + "attention.wk.weight": (args.kv_heads * hd, d),
                   p + "attention.wv.weight": (args.kv_heads * hd, d), p + "attention.wo.weight": (d, args.n_heads * hd),
                   p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w3.weight": (f, d),
                   p + "feed_forward.w2.weight": (d, f), p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (v, d)
    return shapes


# ----------------------------------------------------------------------------------------------- config


def resolve_dtype(dtype: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / None → a floating torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_conversion(section: str, source_key: str, source: str, source_help: str, out: str,
                     dtype: str | None) -> None:
    """The checks every weight-conversion command's config shares (``llamaray export``: ``checkpoint``,
    ``llamaray import``: ``source``): a source and an output are given, the output is not the source, ``dtype`` is
    one of DTYPES or None. ConfigError naming ``<section>.<field>``."""
    if not source:
        raise ConfigError(f"{section}.{source_key}: required ({source_help})")
    if not out:
        raise ConfigError(f"{section}.out: required (the HF directory to write)")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{section}.dtype: {dtype!r} is not one of {list(DTYPES)}")
    if Path(out).resolve() == Path(source).resolve():
        raise ConfigError(f"{section}.out: {out} is the {source_key} itself; write to another directory")


def hf_config_from_args(args: ModelArgs, *, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                        pad_token_id: int | None = None, dtype: str | torch.dtype = "float32") -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` with the shape ``args``.

    RoPE is written in the legacy ``rope_theta`` + ``rope_scaling`` form, which transformers 4.x and 5.x, vLLM and
    llama.cpp's ``convert_hf_to_gguf.py`` all read.
    """
    dtype_name = str(resolve_dtype(dtype) or torch.float32).removeprefix("torch.")
    s = args.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hd,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_base,
        "rope_scaling": None if s is None else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings},
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype_name,  # transformers 4.x
        "dtype": dtype_name,  # transformers 5.x
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def _field(cfg: dict[str, Any], key: str, source: str, *, kind: type = int, positive: bool = True,
           default: Any = None, required: bool = True) -> Any:
    """``cfg[key]`` checked to be a (positive) ``kind``; a clear CheckpointError otherwise."""
    if key not in cfg or cfg[key] is None:
        if required:
            raise CheckpointError(f"{source}: field {key!r} is missing")
        return default
    v = cfg[key]
    ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    if not ok:
        raise CheckpointError(f"{source}: field {key!r} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if positive and v <= 0:
        raise CheckpointError(f"{source}: field {key!r} must be positive, got {v!r}")
    return kind(v)


def args_from_hf_config(cfg: dict[str, Any], source: str = CONFIG_NAME) -> ModelArgs:
    """The inverse of ``hf_config_from_args``: a ``LlamaForCausalLM`` config.json → ModelArgs.

    Rejects other architectures, features our model lacks (biases, other activations, RoPE types other than
    default/llama3) and contradictory shapes with a CheckpointError naming ``source`` and the field.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or archs != ["LlamaForCausalLM"]):
        raise CheckpointError(f"{source}: field 'architectures' is {archs!r}; only ['LlamaForCausalLM'] is supported")
    if cfg.get("model_type") != "llama":
        raise CheckpointError(f"{source}: field 'model_type' is {cfg.get('model_type')!r}; only 'llama' is supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, False):
            raise CheckpointError(f"{source}: field {key!r} is true; llamaray's Llama has no bias terms")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise CheckpointError(f"{source}: field 'pretraining_tp' is {cfg['pretraining_tp']!r}; only 1 is supported")

    dim = _field(cfg, "hidden_size", source)
    n_layers = _field(cfg, "num_hidden_layers", source)
    n_heads = _field(cfg, "num_attention_heads", source)
    n_kv = _field(cfg, "num_key_value_heads", source, required=False, default=n_heads)
    head_dim = _field(cfg, "head_dim", source, required=False)
    if head_dim is None:
        if dim % n_heads:
            raise CheckpointError(f"{source}: field 'hidden_size'={dim} is not divisible by "
                                  f"'num_attention_heads'={n_heads} (and no 'head_dim' is given)")
        head_dim = dim // n_heads
    if n_heads % n_kv:
        raise CheckpointError(f"{source}: field 'num_attention_heads'={n_heads} is not a multiple of "
                              f"'num_key_value_heads'={n_kv}")
    if head_dim % 2:
        raise CheckpointError(f"{source}: field 'head_dim'={head_dim} must be even for RoPE")

    # RoPE: transformers 5 writes rope_parameters (with rope_theta inside), older configs rope_theta + rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    theta_cfg = cfg if "rope_theta" in cfg else (rope or {})
    rope_base = _field(theta_cfg, "rope_theta", source, kind=float, required=False, default=10000.0)
    if rope_base <= 1:
        raise CheckpointError(f"{source}: field 'rope_theta' must be > 1, got {rope_base}")
    scaling = None
    if rope is not None:
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: field {rope_key!r} must be an object or null, got {rope!r}")
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype == "llama3":
            try:
                scaling = RopeScaling(
                    factor=_field(rope, "factor", f"{source} {rope_key}", kind=float),
                    low_freq_factor=_field(rope, "low_freq_factor", f"{source} {rope_key}", kind=float),
                    high_freq_factor=_field(rope, "high_freq_factor", f"{source} {rope_key}", kind=float),
                    original_max_position_embeddings=_field(rope, "original_max_position_embeddings",
                                                            f"{source} {rope_key}"))
            except ConfigError as e:
                raise CheckpointError(f"{source}: field {rope_key!r}: {e}") from e
        elif rtype != "default":
            raise CheckpointError(f"{source}: field {rope_key!r} has rope_type {rtype!r}; "
                                  "only 'default' and 'llama3' are supported")
    try:
        return ModelArgs(
            # canonical form: None when implied (as our presets write it), so round trips compare equal
            dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=None if dim % n_heads == 0 and head_dim == dim // n_heads else head_dim,
            intermediate_size=_field(cfg, "intermediate_size", source),
            vocab_size=_field(cfg, "vocab_size", source),
            norm_eps=_field(cfg, "rms_norm_eps", source, kind=float, required=False, default=1e-6),
            rope_base=rope_base, rope_scaling=scaling,
            max_seq_len=_field(cfg, "max_position_embeddings", source, required=False, default=2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


# ------------------------------------------------------------------------------------------------- save


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids of our Tokenizer protocol (``bos_id``) or of a transformers tokenizer (``bos_token_id``)."""
    out = {}
    for ours, hf in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        v = getattr(tokenizer, ours, None) if tokenizer is not None else None
        if v is None and tokenizer is not None:
            v = getattr(tokenizer, hf, None)
        out[hf] = v if isinstance(v, int) and v >= 0 else None
    return out


def tokenizer_size(tokenizer: Any) -> int:
    """Number of ids a tokenizer can produce (added tokens included for transformers tokenizers)."""
    if hasattr(tokenizer, "save_pretrained") and hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    return int(tokenizer.vocab_size)


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, source: str) -> None:
    """Every id the tokenizer can produce must be a row of the embedding."""
    n = tokenizer_size(tokenizer)
    if n > vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {n} tokens but the model's 'vocab_size' is {vocab_size}; "
                              f"ids {vocab_size}..{n - 1} would index past the embedding")


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    if hasattr(tokenizer, "save"):  # our Tokenizer protocol (model/tokenizer.py)
        tokenizer.save(out_dir)
    elif hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer (GGUF import)
        tokenizer.save_pretrained(str(out_dir))
    else:
        raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}: it has neither save() nor "
                        "save_pretrained()")


def hf_state_dict(model: Transformer, *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Our weights under HF names, as contiguous CPU clones (safetensors refuses shared or strided storage)."""
    tied = model.args.tie_embeddings
    state = model.state_dict()
    if tied and state["output.weight"] is not state["tok_embeddings.weight"] \
            and not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        raise CheckpointError("model.args.tie_embeddings is true but output.weight differs from tok_embeddings.weight "
                              "(the tie was broken, e.g. by load_state_dict(assign=True)); re-tie before save_hf")
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name == "output.weight" and tied:
            continue  # the same tensor as the embedding; HF re-ties it from tie_word_embeddings
        if not isinstance(t, Tensor) or t.is_meta:
            raise CheckpointError(f"parameter {name!r} is not a materialised tensor ({type(t).__name__}); "
                                  "gather sharded (FSDP/DTensor) state into full tensors before save_hf")
        t = t.detach().to("cpu", dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        out[to_hf_name(name)] = t.contiguous().clone()
    return out


def save_hf(model: Transformer, tokenizer: Any, out_dir: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, if not None) as an HF Llama directory at ``out_dir``.

    The files go to a temporary sibling directory which then replaces ``out_dir`` by rename, so a crash never leaves
    a half-written export behind (an existing ``out_dir`` is replaced only once the new one is complete).
    ``dtype`` casts the floating weights (e.g. ``"bfloat16"``); None keeps the model's dtype.
    """
    out_dir = Path(out_dir)
    target = resolve_dtype(dtype)
    args = model.args
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, args.vocab_size, f"tokenizer of type {type(tokenizer).__name__}")
    tensors = hf_state_dict(model, dtype=target)
    stored = target or model.tok_embeddings.weight.dtype
    ids = _special_ids(tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = hf_config_from_args(args, dtype=stored, **ids)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        # Generation stops on every end token the tokenizer names (ours: </s> and the end-of-turn <|end|>), so
        # vLLM and transformers end a chat turn where the reference sampler does.
        stops = [ids["eos_token_id"]] + [t for t in getattr(tokenizer, "stop_ids", []) if t != ids["eos_token_id"]]
        gen = {"bos_token_id": ids["bos_token_id"],
               "eos_token_id": stops if len(stops) > 1 and None not in stops else ids["eos_token_id"],
               "pad_token_id": ids["pad_token_id"], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                             indent=2) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------------------------- load


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def _weight_files(ckpt: Path) -> tuple[list[Path], Path, dict[str, str] | None]:
    """The safetensors files of a checkpoint, the file to name in "missing tensor" errors, and the index map."""
    single, index = ckpt / WEIGHTS_NAME, ckpt / INDEX_NAME
    if single.exists():
        return [single], single, None
    if index.exists():
        idx = _read_json(index)
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index}: field 'weight_map' must map tensor names to file names")
        files = []
        for fname in sorted(set(wmap.values())):
            p = ckpt / fname
            if Path(fname).name != fname or not p.exists():
                raise CheckpointError(f"{index}: field 'weight_map' names shard {fname!r}, which is not in {ckpt}")
            files.append(p)
        return files, index, wmap
    raise CheckpointError(f"{ckpt}: no {WEIGHTS_NAME} nor {INDEX_NAME} (is this an HF checkpoint directory?)")


def read_hf_tensors(ckpt: Path, args: ModelArgs) -> dict[str, Tensor]:
    """All weights of an HF checkpoint, under our names, checked against ``args`` (names and shapes)."""
    files, listing, wmap = _weight_files(ckpt)
    want = {to_hf_name(k): (k, shape) for k, shape in expected_shapes(args).items()}
    # Tolerated extras: a tied lm_head some exporters write anyway, and old rotary caches.
    ignorable = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
    out: dict[str, Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for hf_name in f.keys():
                    if wmap is not None and wmap.get(hf_name) != path.name:
                        raise CheckpointError(f"{path}: tensor {hf_name!r} is not listed for this shard in {INDEX_NAME}")
                    if ignorable.fullmatch(hf_name):
                        continue
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    if hf_name == "lm_head.weight" and args.tie_embeddings:
                        if shape != (args.vocab_size, args.dim):
                            raise CheckpointError(f"{path}: tensor 'lm_head.weight' has shape {shape}, "
                                                  f"expected {(args.vocab_size, args.dim)}")
                        continue  # tied: the embedding is the head
                    if hf_name not in want:
                        raise CheckpointError(f"{path}: unexpected tensor {hf_name!r} (not part of a Llama with "
                                              f"{args.n_layers} layers, tie_word_embeddings={args.tie_embeddings})")
                    ours, expected = want[hf_name]
                    if shape != expected:
                        raise CheckpointError(f"{path}: tensor {hf_name!r} has shape {shape}, expected {expected} "
                                              f"from {CONFIG_NAME}")
                    out[ours] = f.get_tensor(hf_name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file: {e}") from e
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e}") from e
    missing = [hf for hf, (ours, _) in want.items() if ours not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{listing}: missing tensor {missing[0]!r}{more}")
    return out


def model_from_state_dict(args: ModelArgs, state: dict[str, Tensor], *, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer holding exactly ``state`` (our names; no output.weight when tied), without a throwaway init."""
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:  # assign=True replaced the shared Parameter; tie again
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_frequencies(args)
    return model.to(device)


def load_hf(ckpt_dir: str | Path, *, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None) -> tuple[Transformer, Any]:
    """Read an HF Llama directory → (Transformer in eval mode, Tokenizer or None when the directory has none).

    ``dtype`` None keeps the stored dtype. Missing/unexpected/wrongly shaped tensors, corrupt safetensors, configs
    we cannot represent and tokenizers larger than the vocabulary raise CheckpointError naming file and field.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory")
    cfg_path = ckpt / CONFIG_NAME
    args = args_from_hf_config(_read_json(cfg_path), str(cfg_path))
    state = read_hf_tensors(ckpt, args)
    model = model_from_state_dict(args, state, device=device, dtype=resolve_dtype(dtype))
    model.eval()
    tokenizer = None
    if any((ckpt / name).exists() for name in TOKENIZER_FILES):
        from model.tokenizer import load_tokenizer  # model/tokenizer.py: SentencePiece or HF tokenizer

        try:
            tokenizer = load_tokenizer(ckpt)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: the tokenizer files cannot be loaded: {e}") from e
        check_tokenizer_fits(tokenizer, args.vocab_size, f"{ckpt} tokenizer vs {cfg_path}")
    return model, tokenizer
