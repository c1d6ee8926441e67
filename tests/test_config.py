"""YAML presets + --set overrides → typed, validated dataclasses."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, parse_overrides
from model.llama import ModelArgs


@dataclass
class Inner:
    lr: float = 1e-3
    """learning rate"""
    steps: int = 10
    """steps"""


@dataclass
class Outer:
    name: str = "run"
    """run name"""
    inner: Inner = field(default_factory=Inner)
    """nested"""
    model: ModelArgs = field(default_factory=ModelArgs)
    """the model"""
    tags: list[str] = field(default_factory=list)
    """tags"""
    out: Path | None = None
    """output dir"""


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner: {lr: 0.1}\nmodel: {preset: tiny, n_layers: 2}\n")
    cfg = load_config(Outer, p, ["inner.steps=5", "model.dim=512", "tags=[x, y]", "out=/tmp/o"])
    assert cfg.name == "a" and cfg.inner == Inner(lr=0.1, steps=5)
    assert cfg.model.n_layers == 2 and cfg.model.dim == 512 and cfg.model.vocab_size == 4096
    assert cfg.tags == ["x", "y"] and cfg.out == Path("/tmp/o")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``3e-4`` as a string; a float field must still take it, from a file or --set."""
    p = tmp_path / "c.yaml"
    p.write_text("inner: {lr: 1e-3}\n")
    assert load_config(Outer, p).inner.lr == 1e-3
    assert load_config(Outer, p, ["inner.lr=3E+2"]).inner.lr == 300.0
    with pytest.raises(ConfigError, match="expected a number, got str '1e'"):
        load_config(Outer, None, ["inner.lr=1e"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["inner.stepz=3"], r"Outer.inner: unknown field\(s\) \['stepz'\]"),
    (["inner.steps=three"], "Outer.inner.steps: expected an integer, got str 'three'"),
    (["inner.lr=true"], "Outer.inner.lr: expected a number"),
    (["inner=5"], "Outer.inner: expected a mapping"),
    (["noequals"], "expects key=value"),
    (["model.n_heads=5"], "not divisible"),
])
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: the top level must be a mapping"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_extends_merges_the_file_over_its_base_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ninner: {lr: 0.5, steps: 3}\ntags: [a]\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ninner: {steps: 7}\n")
    (tmp_path / "grandchild.yaml").write_text(f"extends: {tmp_path / 'child.yaml'}\nname: g\n")
    cfg = load_config(Outer, tmp_path / "grandchild.yaml", ["inner.lr=0.25"])
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps, cfg.tags) == ("g", 0.25, 7, ["a"])


def test_extends_refuses_loops_and_missing_bases(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends loops back"):
        load_config(Outer, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: no-such-preset\n")
    with pytest.raises(ConfigError, match="no-such-preset"):
        load_config(Outer, tmp_path / "c.yaml")


PRESET_JOBS = {  # preset → (its job's config class, the overrides its header comment tells the user to add; {hf}:
    # a directory with a config.json, for the jobs that check their model directory when the config loads)
    "tiny": ("jobs.pretrain:PretrainConfig", []), "llama-1b": ("jobs.pretrain:PretrainConfig", []),
    "smollm2-135m": ("jobs.pretrain:PretrainConfig", []),
    "tokenizer-tiny": ("jobs.tokenizer:TokenizerJobConfig", ["input=[corpus.txt]"]),
    "finetune-tiny": ("jobs.sft:SftConfig", ["init=runs/pretrain-tiny/hf", "data.train=sft.jsonl"]),
    "sft-tiny": ("jobs.sft:SftConfig", ["init=runs/pretrain-tiny/hf"]),
    "sft-smollm2": ("jobs.sft:SftConfig", ["init=SmolLM2-135M-Instruct.Q4_1.gguf"]),
    "dpo-tiny": ("jobs.dpo:DpoConfig", ["init=runs/sft-tiny/hf"]),
    "rm-tiny": ("jobs.rm:RmConfig", ["init=runs/sft-tiny/hf"]),
    "rs-tiny": ("jobs.rejection_sampling:RSConfig", ["model={hf}"]),
    "rs-rounds-tiny": ("jobs.rs_rounds:RoundsConfig", ["policy={hf}", "prompts=p.jsonl", "heldout=h.jsonl"]),
    "grpo-tiny": ("jobs.grpo:GrpoConfig", ["policy={hf}", "prompts=p.jsonl", "heldout=h.jsonl"]),
    "pipeline-tiny": ("jobs.pipeline:PipelineConfig", []), "serve-tiny": ("jobs.serve:ServeJobConfig", []),
}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_preset_loads_into_its_job_config(preset, tmp_path, monkeypatch):
    """A preset with a misspelt or stale field fails here, not in a user's first run; a new preset must be listed."""
    import importlib

    assert preset in PRESET_JOBS, f"configs/{preset}.yaml: add it to PRESET_JOBS with the config class it is for"
    target, overrides = PRESET_JOBS[preset]
    module, cls = target.split(":")
    monkeypatch.chdir(tmp_path)  # the input files that configs check exist at load time, empty
    (tmp_path / "config.json").write_text("{}")
    for f in ("p.jsonl", "h.jsonl", "runs/tasks/math-prompts.jsonl"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    load_config(getattr(importlib.import_module(module), cls), preset, [o.format(hf=tmp_path) for o in overrides])
