"""HF-format checkpoints (model/hf.py): parity with transformers both ways, and every bad file named clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from model.hf import (CheckpointError, args_from_hf_config, expected_shapes, hf_config_from_args, load_hf, save_hf,
                      to_hf_name)
from model.llama import ModelArgs, RopeScaling, build_model

# Two shapes: the CPU preset (tied, GQA 4:2) and a small untied GQA 4:1 model with Llama 3 RoPE scaling whose
# original context (32) is shorter than the test prompt, so the scaled low frequencies actually matter.
PRESETS = {
    "tiny": ModelArgs.from_name("tiny"),
    "gqa-untied-llama3": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=1, intermediate_size=256, vocab_size=300,
                                   max_seq_len=256, rope_base=500000.0, tie_embeddings=False, norm_eps=1e-6,
                                   rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                            original_max_position_embeddings=32)),
}


def random_model(args: ModelArgs, seed: int = 0):
    """A random model whose norm weights are not all ones (so a swapped norm mapping would show in the logits)."""
    model = build_model(args, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def prompt(vocab: int, B: int = 2, T: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_export_loads_in_transformers_with_same_logits(preset, tmp_path):
    args = PRESETS[preset]
    ours = random_model(args)
    out = save_hf(ours, None, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not args.tie_embeddings)

    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(ref, LlamaForCausalLM)
    x = prompt(args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, rtol=1e-4, atol=1e-4)

    # …and back into ours, bit for bit.
    back, tok = load_hf(out)
    assert tok is None and back.args == args
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    if args.tie_embeddings:
        assert back.output.weight is back.tok_embeddings.weight


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_llama_imports_with_same_logits(tied, tmp_path):
    cfg = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, rms_norm_eps=1e-5,
                      tie_word_embeddings=tied, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones; make them informative
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")

    ours, _ = load_hf(tmp_path / "hf")
    assert ours.args.tie_embeddings is tied and ours.args.kv_heads == 2 and ours.args.hd == 16
    assert ours.args.rope_scaling == RopeScaling(4.0, 1.0, 4.0, 16)
    x = prompt(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_loads(tmp_path):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      vocab_size=500, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    ours, _ = load_hf(tmp_path / "hf")
    x = prompt(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_dtype_export_and_config_round_trip(tmp_path):
    args = PRESETS["gqa-untied-llama3"]
    model = random_model(args)
    out = save_hf(model, None, tmp_path / "bf16", dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert args_from_hf_config(cfg) == args == args_from_hf_config(hf_config_from_args(args))
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    back, _ = load_hf(out)
    assert back.tok_embeddings.weight.dtype == torch.bfloat16
    torch.testing.assert_close(back.tok_embeddings.weight.float(), model.tok_embeddings.weight, rtol=1e-2, atol=1e-2)
    assert load_hf(out, dtype="float32")[0].tok_embeddings.weight.dtype == torch.float32
    assert model.tok_embeddings.weight.dtype == torch.float32  # the caller's model is left alone


class _ExplodingTokenizer:
    vocab_size, bos_id, eos_id, pad_id = 10, 1, 2, -1

    def save(self, out_dir):
        (Path(out_dir) / "tokenizer.model").write_bytes(b"half")
        raise RuntimeError("disk full")


def test_save_is_atomic(tmp_path):
    args = PRESETS["gqa-untied-llama3"]
    out = save_hf(random_model(args, seed=1), None, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(random_model(args, seed=2), _ExplodingTokenizer(), out)
    assert (out / "model.safetensors").read_bytes() == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp directory left behind
    save_hf(random_model(args, seed=2), None, out)  # replacing an existing export works
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def good_dir(tmp_path) -> Path:
    return save_hf(random_model(PRESETS["gqa-untied-llama3"]), None, tmp_path / "good")


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


def test_truncated_safetensors(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_hf(good_dir)
    assert str(f) in str(e.value)


def test_corrupt_safetensors_header(good_dir):
    f = good_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts at byte 8
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_hf(good_dir)
    assert str(f) in str(e.value)


def test_missing_tensor(good_dir):
    f = good_dir / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'") as e:
        load_hf(good_dir)
    assert str(f) in str(e.value)


def test_wrong_shape(good_dir):
    f = good_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 128)  # 2 kv heads' worth, config says 1
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 128\), "
                                              r"expected \(32, 128\)") as e:
        load_hf(good_dir)
    assert str(f) in str(e.value)


def test_unexpected_tensor(good_dir):
    f = good_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(256, 128)  # a layer the config does not have
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'") as e:
        load_hf(good_dir)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("changes, field", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"model_type": "gpt2", "architectures": None}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"hidden_size": 130, "head_dim": None}, "hidden_size"),  # 130 not divisible by 4 heads
    ({"num_key_value_heads": 3}, "num_key_value_heads"),  # 4 heads not a multiple of 3
    ({"vocab_size": -5}, "vocab_size"),
    ({"num_hidden_layers": "two"}, "num_hidden_layers"),
    ({"intermediate_size": None}, "intermediate_size"),
])
def test_bad_config_names_file_and_field(good_dir, changes, field):
    cfg_path = _edit_config(good_dir, **changes)
    with pytest.raises(CheckpointError) as e:
        load_hf(good_dir)
    assert str(cfg_path) in str(e.value) and f"'{field}'" in str(e.value), str(e.value)


def test_config_not_json_and_no_weights(tmp_path, good_dir):
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        load_hf(good_dir)
    assert str(good_dir / "config.json") in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_hf(empty)
    (empty / "config.json").write_text(json.dumps(hf_config_from_args(PRESETS["tiny"])))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(empty)


class _BigTokenizer:
    vocab_size, bos_id, eos_id, pad_id = 301, 1, 2, 0

    def save(self, out_dir):  # pragma: no cover - never reached
        raise AssertionError("save_hf must refuse before writing")


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    model = random_model(PRESETS["gqa-untied-llama3"])  # vocab 300
    with pytest.raises(CheckpointError, match=r"301 tokens but the model's 'vocab_size' is 300"):
        save_hf(model, _BigTokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_broken_tie_is_refused(tmp_path):
    model = random_model(PRESETS["tiny"])
    model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach() + 1)  # tie_embeddings=True in args
    with pytest.raises(CheckpointError, match="output.weight differs from tok_embeddings.weight"):
        save_hf(model, None, tmp_path / "out")


def test_names_cover_every_parameter():
    for args in PRESETS.values():
        model = build_model(args, device="meta")
        names = {n for n, _ in model.named_parameters()}  # a tied output.weight is listed once, as the embedding
        assert names == set(expected_shapes(args))
        assert len({to_hf_name(n) for n in expected_shapes(args)}) == len(expected_shapes(args))
        assert dataclasses.replace(args) == args_from_hf_config(hf_config_from_args(args))


# ------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def sp_tokenizers(tmp_path_factory):
    """Two real SentencePiece tokenizers (300 and 320 ids) trained on a small generated corpus."""
    from model.tokenizer import SentencePieceTokenizer

    d = tmp_path_factory.mktemp("tok")
    words = ["alpha", "beta", "gamma", "delta", "llama", "ray", "export", "tensor", "shard", "token"]
    lines = [" ".join(words[(i * j) % len(words)] for j in range(1, 9)) for i in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    small = SentencePieceTokenizer.train([d / "corpus.txt"], d / "small", vocab_size=300, exact_vocab=True)
    big = SentencePieceTokenizer.train([d / "corpus.txt"], d / "big", vocab_size=320, exact_vocab=True)
    return small, big, d


def test_tokenizer_round_trips_with_the_export(sp_tokenizers, tmp_path):
    small, _, _ = sp_tokenizers
    model = random_model(PRESETS["gqa-untied-llama3"])  # vocab 300
    out = save_hf(model, small, tmp_path / "hf")
    assert (out / "tokenizer.model").exists()
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (small.bos_id, small.stop_ids)  # </s> and <|end|>
    back, tok = load_hf(out)
    text = "llama export tensor"
    assert tok.encode(text) == small.encode(text)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == small.encode(text)


def test_tokenizer_larger_than_vocab_in_directory(sp_tokenizers, tmp_path):
    small, big, _ = sp_tokenizers
    out = save_hf(random_model(PRESETS["gqa-untied-llama3"]), small, tmp_path / "hf")
    big.save(out)  # someone copies a 320-id tokenizer over the 300-row model
    with pytest.raises(CheckpointError) as e:
        load_hf(out)
    msg = str(e.value)
    assert str(out) in msg and "320" in msg and "'vocab_size' is 300" in msg, msg


# ------------------------------------------------------------------------------------------- jobs


def test_export_job_hf_to_bfloat16(tmp_path, capsys):
    from jobs.export import main

    src = save_hf(random_model(PRESETS["tiny"]), None, tmp_path / "fp32")
    out = tmp_path / "bf16"
    assert main(["--set", f"checkpoint={src}", "--set", f"out={out}", "--set", "dtype=bfloat16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["source"] == "hf" and summary["dtype"] == "bfloat16"
    assert summary["params"] == PRESETS["tiny"].num_params()
    assert (out / "model.safetensors").stat().st_size < 0.6 * (src / "model.safetensors").stat().st_size
    assert load_hf(out)[0].tok_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("argv, needle", [
    (["--set", "out=x"], "export.checkpoint: required"),
    (["--set", "checkpoint=/nonexistent/ckpt", "--set", "out=x"], "/nonexistent/ckpt: checkpoint directory not found"),
    (["--set", "checkpoint=.", "--set", "out=y", "--set", "dtype=int8"], "export.dtype: 'int8'"),
])
def test_export_job_bad_settings(argv, needle, capsys):
    from jobs.export import main

    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_export_job_from_dcp_checkpoint(sp_tokenizers, tmp_path, capsys):
    checkpointing = pytest.importorskip("training.checkpointing", reason="DCP checkpoints land with pretraining")
    from jobs.export import main

    small, _, tok_dir = sp_tokenizers
    args = PRESETS["gqa-untied-llama3"]
    model = random_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = tmp_path / "checkpoint_000001"
    checkpointing.save(ckpt, model, opt, {"step": 1, "model": args.to_dict()}, rank=0)
    out = tmp_path / "hf"
    assert main(["--set", f"checkpoint={ckpt}", "--set", f"out={out}", "--set", f"tokenizer={tok_dir / 'small'}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["source"] == "dcp"
    back, tok = load_hf(out)
    assert tok.encode("ray shard") == small.encode("ray shard")
    x = prompt(args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_import_job_hf_dir_as_module_and_cli(tmp_path):
    import subprocess
    import sys

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "src")
    out = tmp_path / "ours"
    r = subprocess.run([sys.executable, "-m", "jobs.import_model", "--set", f"source={tmp_path / 'src'}",
                        "--set", f"out={out}"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["source"] == "hf" and summary["params"] == ref.num_parameters() == ours_params(out)
    assert f"imported {summary['params']:,} parameters" in r.stderr

    from jobs.cli import main as cli

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg.to_dict(), "hidden_act": "relu"}))
    assert cli(["import", "--set", f"source={bad}", "--set", f"out={tmp_path / 'x'}"]) == 2
    assert not (tmp_path / "x").exists()


def ours_params(d: Path) -> int:
    return sum(p.numel() for p in load_hf(d)[0].parameters())


def test_generation_config_stops_on_every_end_token(tmp_path):
    """vLLM reads generation_config.json's eos list: our chat turns end on <|end|> there too."""
    import json

    from model.hf import save_hf
    from model.llama import ModelArgs, build_model
    from model.tokenizer import SentencePieceTokenizer

    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(f"line {i} of some text" for i in range(300)))
    tok = SentencePieceTokenizer.train([txt], vocab_size=300)
    out = save_hf(build_model(ModelArgs.from_name("tiny", n_layers=1, vocab_size=300)), tok, tmp_path / "m")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.stop_ids == [tok.eos_id, tok.encode("<|end|>")[0]]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id
