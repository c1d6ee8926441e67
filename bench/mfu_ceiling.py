"""The fastest a training step of a preset can possibly run on this GPU: its matmuls and attention timed alone.

A training step of a LLaMA is, in FLOPs, almost only matrix multiplications (three per linear layer: forward, input
gradient, weight gradient) and attention (forward + backward). This script times exactly those kernels at the step's
shapes — cuBLAS through ``torch.mm`` in bf16, and ``F.scaled_dot_product_attention`` with each backend PyTorch offers
— and adds them up. Everything else a real step does (norms, RoPE, SwiGLU, residuals, cross-entropy, the optimizer,
FSDP's copies, kernel launches) is left out, so the sum is a floor on the step time and

    ceiling tokens/s = tokens per step / floor,   ceiling MFU = ceiling tokens/s × flops_per_token / peak

is an upper bound on what ``bench/pretrain_mfu.py`` can measure with these kernels, whatever the training loop does.
The linear layers are timed twice: as the model has them (q, k, v, o, w1, w3, w2 separate) and fused (qkv, o,
w1|w3, w2), to show what fusing projections could buy.

    python bench/mfu_ceiling.py                       # llama-1b, seq 2048, micro 16 (bench/pretrain_mfu.py's run)
    python bench/mfu_ceiling.py --micro 8 --seq 2048

Prints one JSON line. Needs CUDA.

Measured 2026-11-26, H100 80GB HBM3 (nvidia-h100-x1), torch 2.11.0+cu130, llama-1b, seq 2048, micro 16, three
machines: floor 399.6 / 400.5 / 392.5 ms per 32 768-token step → ceiling 82.0 k / 81.8 k / 83.5 k tokens/s = 55.1 % /
55.0 % / 56.1 % MFU by the prescribed formula; GEMMs at 700 TFLOP/s; attention per layer cuDNN 3.28 ms, flash 4.97 ms
(efficient: no kernel for these shapes); fused projections 399.6 → 398.7 ms. bench/pretrain_mfu.py measured 66.1 k
tokens/s (44.4 %) through Ray Train on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.llama import ModelArgs  # noqa: E402
from training.flops import peak_flops  # noqa: E402


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current stream (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def linear_ms(tokens: int, d_in: int, d_out: int, reps: int) -> float:
    """Forward (x·Wᵀ), input gradient (dy·W) and weight gradient (dyᵀ·x) of one bias-free linear layer (bf16)."""
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    x, w, dy = torch.randn(tokens, d_in, **kw), torch.randn(d_out, d_in, **kw), torch.randn(tokens, d_out, **kw)
    return (time_ms(lambda: x @ w.t(), reps) + time_ms(lambda: dy @ w, reps)
            + time_ms(lambda: dy.t() @ x, reps))


def attention_ms(args: ModelArgs, batch: int, seq: int, reps: int) -> dict[str, float | str]:
    """Causal SDPA forward + backward per layer, for each backend that accepts the shapes (GQA via enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kw = {"device": "cuda", "dtype": torch.bfloat16, "requires_grad": True}
    q = torch.randn(batch, args.n_heads, seq, args.hd, **kw)
    k, v = (torch.randn(batch, args.kv_heads, seq, args.hd, **kw) for _ in range(2))
    gqa = args.n_heads != args.kv_heads
    rep = args.n_heads // args.kv_heads

    def shared_kv():  # enable_gqa: the kernel reads each K/V head for its group of query heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        y.backward(torch.ones_like(y))

    def copied_kv():  # the pre-enable_gqa way: copy K/V to every query head (the copies are timed too)
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        y.backward(torch.ones_like(y))

    def timed(backend: SDPBackend, step) -> float | str:
        try:
            with sdpa_kernel(backend):
                return round(time_ms(step, reps), 3)
        except RuntimeError as e:  # this backend refuses these shapes / this GPU
            return f"unavailable: {str(e).splitlines()[0][:160]}"

    flash, cudnn = SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION
    out = {b.name.lower(): timed(b, shared_kv) for b in (flash, cudnn, SDPBackend.EFFICIENT_ATTENTION)}
    if gqa:
        out.update({f"{b.name.lower()}_kv_copied": timed(b, copied_kv) for b in (flash, cudnn)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=16, help="sequences per GPU per step (bench/pretrain_mfu.py --micro)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/mfu_ceiling.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True

    args = ModelArgs.from_name(a.preset)
    M, d, f = a.micro * a.seq, args.dim, args.intermediate_size
    q_out, kv_out = args.n_heads * args.hd, args.kv_heads * args.hd
    separate = {"q": (d, q_out), "k": (d, kv_out), "v": (d, kv_out), "o": (q_out, d),
                "w1": (d, f), "w3": (d, f), "w2": (f, d)}
    fused = {"qkv": (d, q_out + 2 * kv_out), "o": (q_out, d), "w13": (d, 2 * f), "w2": (f, d)}
    lin_sep = {n: round(linear_ms(M, *s, a.reps), 3) for n, s in separate.items()}
    lin_fused = {n: round(linear_ms(M, *s, a.reps), 3) for n, s in fused.items()}
    head = round(linear_ms(M, d, args.vocab_size, a.reps), 3)
    attn = attention_ms(args, a.micro, a.seq, a.reps)
    best_attn = min(v for v in attn.values() if isinstance(v, float))

    peak = peak_flops(torch.cuda.get_device_name(0))  # None: an unknown card, no MFU figure

    def ceiling(linears: dict[str, float]) -> dict[str, float | None]:
        floor = args.n_layers * (sum(linears.values()) + best_attn) + head
        tps = M / (floor / 1e3)
        return {"floor_ms": round(floor, 1), "tokens_per_s": round(tps),
                "mfu": round(tps * args.flops_per_token(a.seq) / peak, 4) if peak else None}

    gemm_flops = 6 * M * (args.n_layers * sum(i * o for i, o in separate.values()) + d * args.vocab_size)
    gemm_ms = args.n_layers * sum(lin_sep.values()) + head
    print(json.dumps({
        "bench": "mfu_ceiling", "preset": a.preset, "seq": a.seq, "micro": a.micro, "tokens_per_step": M,
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "linear_ms_per_layer": lin_sep, "fused_linear_ms_per_layer": lin_fused, "head_ms": head,
        "attention_ms_per_layer": attn,
        "gemm_tflops": round(gemm_flops / gemm_ms / 1e9, 1),
        "ceiling": ceiling(lin_sep), "ceiling_fused_projections": ceiling(lin_fused),
        "flops_per_token_formula": args.flops_per_token(a.seq), "peak": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
