"""The LLaMA decoder in plain PyTorch.

token embedding → N × [RMSNorm → GQA attention with RoPE → residual → RMSNorm → SwiGLU MLP → residual]
→ RMSNorm → output head (tied to the embedding or not).

The layout and parameter names follow gpt-fast / torchtitan; the rotary convention is Hugging Face's
("rotate half"), so HF Llama checkpoints map onto this module by renaming alone (see ``model/hf.py``).
Nothing here knows about devices, Ray or torch.distributed: sharding is applied from outside (``training/parallel.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling of RoPE ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    """How much longer the target context is than the context the model was trained on."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """The context length of the pretraining run that the scaling extends."""

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling: need factor > 0 and high_freq_factor > low_freq_factor > 0, got {self}")


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a LLaMA-style decoder. ``ModelArgs.from_name("tiny")`` gives a preset."""

    dim: int = 256
    """Width of the residual stream (HF: hidden_size)."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per attention layer."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads (plain multi-head attention)."""
    head_dim: int | None = None
    """Width of one head; None means dim // n_heads."""
    intermediate_size: int = 688
    """Hidden width of the SwiGLU MLP."""
    vocab_size: int = 4096
    """Number of token ids, including special tokens."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_base: float = 10000.0
    """RoPE base frequency θ (HF: rope_theta)."""
    rope_scaling: RopeScaling | None = None
    """Llama 3 RoPE frequency scaling, or None for plain RoPE."""
    max_seq_len: int = 512
    """Longest context the model is trained or served with (HF: max_position_embeddings)."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "intermediate_size", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}")
        if self.hd % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.hd}")
        if self.norm_eps <= 0 or self.rope_base <= 1:
            raise ConfigError(f"need norm_eps > 0 and rope_base > 1, got {self.norm_eps}, {self.rope_base}")
        if isinstance(self.rope_scaling, dict):  # allowed when built by hand; normalise
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> "ModelArgs":
        """Build from a plain dict (YAML, JSON); ``preset`` picks a base that the other keys override."""
        d = dict(d)
        base = cls.from_name(d.pop("preset")) if "preset" in d else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return dataclasses.replace(base, **d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def block_matmul_params(self) -> int:
        """Weights of one block's seven projections: wq, wo, wk, wv, w1, w3, w2."""
        attn = self.dim * self.hd * (self.n_heads * 2 + self.kv_heads * 2)  # wq, wo, wk, wv
        return attn + 3 * self.dim * self.intermediate_size

    def num_params(self, *, embedding: bool = True) -> int:
        """Parameter count (a tied head counted once); ``embedding=False`` leaves out the token embedding."""
        block = self.block_matmul_params() + 2 * self.dim  # + the two norms
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        n = self.n_layers * block + self.dim + head
        return n + emb if embedding else n

    def matmul_params(self) -> int:
        """N of the MFU formula: the weights of every matmul a token goes through — the seven projections of each
        block and the output head, tied to the embedding or not (Megatron-LM's convention; the embedding lookup and
        the norms are no matmuls)."""
        return self.n_layers * self.block_matmul_params() + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6·N + 12·L·H·Q·T (PaLM appendix B), N = matmul_params()."""
        return 6 * self.matmul_params() + 12 * self.n_layers * self.n_heads * self.hd * seq_len


PRESETS: dict[str, ModelArgs] = {
    # The CPU default: head_dim 64 because vLLM's CPU attention refuses smaller heads.
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=688, vocab_size=4096,
                      max_seq_len=512, tie_embeddings=True),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                              vocab_size=49152, rope_base=100000.0, max_seq_len=8192, tie_embeddings=True),
    # Llama 3.2 1B.
    "llama-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
                          vocab_size=128256, rope_base=500000.0, max_seq_len=8192, tie_embeddings=True,
                          rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192)),
    # The seed's model: LLaMA-1 7B.
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008, vocab_size=32000,
                          max_seq_len=2048, norm_eps=1e-6),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                           vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
}


# ----------------------------------------------------------------------------------------------------- RoPE


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies θ_i = base^(-2i/d), with Llama 3 scaling if configured.  # (head_dim/2,)"""
    hd = args.hd
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, n_heads, T, head_dim); cos, sin: (B, 1, T, head_dim)."""
    return (x * cos + rotate_half(x) * sin).type_as(x)


# --------------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences; ``length`` positions are filled."""

    k: list[Tensor]  # n_layers × (B, n_kv_heads, max_len, head_dim)
    v: list[Tensor]
    length: int = 0

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, max_len: int, *, device=None, dtype=torch.float32) -> "KVCache":
        shape = (batch, args.kv_heads, max_len, args.hd)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)])

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished sequences drop out of a decode)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.hd
        self.wq = nn.Linear(args.dim, args.n_heads * args.hd, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.hd, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.hd, bias=False)
        self.wo = nn.Linear(args.n_heads * args.hd, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:  # write this step's keys/values, attend over everything filled so far
            end = cache.length + T
            cache.k[self.layer_id][:, :, cache.length:end] = k
            cache.v[self.layer_id][:, :, cache.length:end] = v
            k, v = cache.k[self.layer_id][:, :, :end], cache.v[self.layer_id][:, :, :end]  # (B, n_kv, S, hd)

        # GQA: each group of n_heads / n_kv_heads query heads shares one key/value head; SDPA's enable_gqa
        # broadcasts the shared heads inside the kernel instead of copying K/V (and a KV cache) n_heads/n_kv times.
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, n_heads, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # mask: (B, 1, T, S) bool
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads·hd)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) ⊙ w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Transformer":
        """GPT-2 style init: N(0, std); residual projections scaled by 1/sqrt(2·n_layers); norms to 1."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = std / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * s)
        self.inv_freq = rope_frequencies(self.args).to(self.inv_freq.device)
        return self

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for integer positions (B, T) → each (B, 1, T, head_dim)."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                      mask: Tensor | None = None) -> Tensor:
        """Final-norm hidden states (B, T, dim). Without cache or mask the attention is plain causal."""
        B, T = tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if cache is not None and mask is None:
            raise ValueError("decoding with a KV cache needs an explicit attention mask (B, 1, T, S)")
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = self.rope(positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, mask)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab_size) in float32."""
        return self.output(self.hidden_states(tokens, positions, cache, mask)).float()


def build_model(args: ModelArgs, *, device: str | torch.device = "cpu", seed: int | None = 0) -> Transformer:
    """A freshly initialised model; ``device="meta"`` builds the skeleton only (for sharded loading)."""
    with torch.device(device):
        model = Transformer(args)
    if str(device) != "meta":
        model.init_weights(seed=seed)
    return model
