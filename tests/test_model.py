"""The LLaMA module on its own: shapes, presets, cached decoding, config validation."""

import dataclasses

import pytest
import torch

from core.config import ConfigError
from model.llama import PRESETS, KVCache, ModelArgs, RopeScaling, build_model


def small(**kw) -> ModelArgs:
    return ModelArgs.from_name("tiny", n_layers=2, vocab_size=97, **kw)


@pytest.mark.parametrize(("name", "expected"), [
    ("smollm2-135m", 134_515_008),   # HF SmolLM2-135M: 134.5 M
    ("llama-1b", 1_235_814_400),     # Llama 3.2 1B: 1.24 B
    ("llama-7b", 6_738_415_616),     # LLaMA 7B: 6.74 B
    ("llama3-8b", 8_030_261_248),    # Llama 3 8B: 8.03 B
])
def test_preset_parameter_counts_match_published_models(name, expected):
    assert PRESETS[name].num_params() == expected


def test_tiny_preset_param_count_equals_module():
    args = ModelArgs.from_name("tiny")
    model = build_model(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    assert args.hd >= 64  # vLLM's CPU attention refuses smaller heads


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_counts_every_matmul_by_hand(tied):
    """dim 8, 2 layers, 2 heads of 4, 1 KV head, MLP 16, vocabulary 10. Per block: wq 8·8 + wk 8·4 + wv 8·4 + wo 8·8
    = 192, w1 + w3 + w2 = 3·8·16 = 384 → 576; two blocks 1152; the head 10·8 = 80, tied or not → N = 1232.
    Attention at T = 5: 12·L·H·Q·T = 12·2·2·4·5 = 960. 6·1232 + 960 = 8352."""
    a = ModelArgs(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=16, vocab_size=10,
                  tie_embeddings=tied)
    assert a.matmul_params() == 1232
    assert a.flops_per_token(5) == 8352
    model = build_model(a)  # the same N read off the module: every nn.Linear weight, the (tied) head included
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) == 1232


@pytest.mark.parametrize("kv_heads", [None, 1, 2])
def test_cached_decode_equals_full_forward(kv_heads):
    args = small(n_kv_heads=kv_heads)
    model = build_model(args, seed=1).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.empty(args, batch=2, max_len=16)
        causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
        steps = [model(tokens[:, :7], cache=cache, mask=causal)]
        for t in range(7, 12):
            steps.append(model(tokens[:, t:t + 1], cache=cache, mask=torch.ones(2, 1, 1, t + 1, dtype=torch.bool)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = build_model(small(tie_embeddings=True))
    untied = build_model(small(tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_llama3_rope_scaling_changes_only_low_frequencies():
    from model.llama import rope_frequencies
    plain = rope_frequencies(ModelArgs.from_name("llama-1b", rope_scaling=None))
    scaled = rope_frequencies(ModelArgs.from_name("llama-1b"))
    assert torch.equal(plain[:4], scaled[:4])                         # high frequencies untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 32.0)           # longest wavelengths divided by the factor


@pytest.mark.parametrize(("change", "message"), [
    ({"dim": 250}, "not divisible"),
    ({"n_kv_heads": 3}, "not a multiple"),
    ({"vocab_size": 0}, "vocab_size must be positive"),
    ({"norm_eps": 0.0}, "norm_eps"),
])
def test_contradictory_configs_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(ModelArgs.from_name("tiny"), **change)


def test_from_dict_rejects_unknown_fields_and_presets():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['n_layer'\]"):
        ModelArgs.from_dict({"preset": "tiny", "n_layer": 3})
    with pytest.raises(ConfigError, match="unknown model preset 'tinny'"):
        ModelArgs.from_dict({"preset": "tinny"})
    args = ModelArgs.from_dict({"preset": "llama-1b", "n_layers": 2, "rope_scaling": {"factor": 8.0}})
    assert args.n_layers == 2 and args.rope_scaling == RopeScaling(factor=8.0)


def test_rope_scaling_validation():
    with pytest.raises(ConfigError, match="high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
