"""DPO end to end on CPU: 2 Ray Train workers (gloo, FSDP2), synthetic arithmetic preference pairs.

A DPO run from random weights cannot tell a right sum from a wrong one on held-out pairs (measured: implicit-reward
accuracy 0.53 after 100 steps), so DPO starts from the export of the session's shared SFT run (tests/sft_task.py:
300 steps of 16 chats on the same one-digit additions) — the usual SFT → DPO order. Pairs are
tasks/arithmetic.dpo_row (the correct worked answer vs the same answer with the sum off by ±1, ±2 or ±10); held-out pairs come from another seed.

Measurements that set the bars (2 CPU workers): init = a 100-step SFT, 60 DPO steps at lr 1e-3: held-out accuracy
0.02 → 0.59 with chosen log-probs collapsing (−7 → −35; lr too high). Kept setting (300-step SFT init, 100 DPO steps,
lr 5e-4, β 0.1): held-out implicit-reward accuracy 0.05 → 0.81 (step 50) → 0.92, reward margin 0 → 1.08, policy
log-prob margin (chosen − rejected) 14.4 → 25.1 nats. Bars: accuracy ≥ 0.6, reward margin ≥ 0.3, log-prob margin up
by ≥ 2 nats. Since stop 19 the run stops at step 50, where every bar was already met (suite of 2026-12-08: accuracy
0 → 0.77, reward margin 0 → 0.48, log-prob margin 8.7 → 13.5; step 100 added 0.80 / 0.59 / 14.6 for 45 s more).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from core.config import load_config
from jobs.dpo import DpoConfig, dpo, main
from training.sft_data import read_rows, render_all, render_pair, write_jsonl
from tasks.arithmetic import dpo_row, problems

pytestmark = pytest.mark.timeout(900)

SMALL = ["model.preset=tiny", "model.dim=128", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.intermediate_size=344", "model.max_seq_len=256"]
BAD_PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4"},  # identical
    {"prompt": "What is 2 + 2?", "chosen": "", "rejected": "5"},  # empty
    {"prompt": "x " * 400, "chosen": "4", "rejected": "5"},  # too long
    {"prompt": "What is 2 + 2?", "chosen": "4"},  # no rejected
]


def common(storage: Path, name: str) -> list[str]:
    return SMALL + [f"run.storage={storage}", f"run.name={name}", "run.progress=false", "run.ckpt_every=0"]


@pytest.fixture(scope="module")
def sft_init(sft_trained) -> Path:
    """The session's shared SFT run (tests/sft_task.py: 300 steps of 16 one-digit additions) — DPO starts from it."""
    return Path(sft_trained[1]["export"])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    train = [dpo_row(p, rng) for p in problems(1000, seed=1, digits=1, ops="+")]
    val = [dpo_row(p, rng) for p in problems(64, seed=2, digits=1, ops="+", prefix="val")]
    return {"train": write_jsonl(train[:500] + BAD_PAIRS + train[500:], d / "train.jsonl"),
            "val": write_jsonl(val, d / "val.jsonl")}


def dpo_overrides(start: Path, pairs: dict[str, Path], storage: Path, name: str, **extra) -> list[str]:
    base = {"init": start, "data.train": pairs["train"], "data.val": pairs["val"], "train.max_steps": 50,
            "train.batch_size": 16, "train.micro_batch_size": 8, "train.lr": 5e-4, "train.warmup_steps": 5,
            "train.eval_sequences": 64, "run.eval_every": 25, "beta": 0.1}
    base.update(extra)
    return common(storage, name) + [f"{k}={v}" for k, v in base.items()]


def evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics" / "eval.jsonl").read_text().splitlines()]


def test_bad_pairs_are_dropped_by_reason(sft_init, pairs):
    from model.tokenizer import load_tokenizer

    r = render_all(read_rows(pairs["train"]), render_pair, load_tokenizer(sft_init), 256)
    assert len(r.rows) == 1000
    assert dict(r.dropped) == {"identical_pair": 1, "empty_response": 1, "too_long": 1, "bad_schema": 1}
    # only the answer is labelled: the labelled tokens of chosen decode to the answer + end marker
    tok = load_tokenizer(sft_init)
    ci, cl, ri, rl = r.rows[0]
    row = read_rows(pairs["train"])[0]
    assert tok.decode([t for t in cl if t != -100]) == row["chosen"] + "<|end|>"
    assert tok.decode([t for t in rl if t != -100]) == row["rejected"] + "<|end|>"


@pytest.mark.parametrize("extra, message", [
    ({"beta": 0.0}, "beta must be > 0"),
    ({"nll_weight": -0.2}, "nll_weight must be >= 0"),
    ({"data.train": "/nonexistent.jsonl"}, "data file not found"),
    ({"init": "/nonexistent-model"}, "does not exist"),
])
def test_config_errors_before_any_worker(extra, message, sft_init, pairs, tmp_path, capsys):
    assert main([f"--set={a}" for a in dpo_overrides(sft_init, pairs, tmp_path, "bad", **extra)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics").exists()


@pytest.fixture(scope="module")
def full_dpo(sft_init, pairs, tmp_path_factory):
    out = dpo(load_config(DpoConfig, "dpo-tiny", dpo_overrides(sft_init, pairs, tmp_path_factory.mktemp("d"), "full")))
    return Path(out["run_dir"]), out


def test_dpo_raises_held_out_margin_and_accuracy(full_dpo):
    run, out = full_dpo
    ev = evals(run)
    assert [e["step"] for e in ev] == [0, 25, 50]
    first, last = ev[0], ev[-1]
    assert abs(first["val_reward_margin"]) < 1e-3 and first["val_reward_accuracy"] <= 0.2  # policy == reference
    assert last["val_reward_accuracy"] >= 0.6, ev
    assert last["val_reward_margin"] >= 0.3, ev
    assert last["val_logp_margin"] >= first["val_logp_margin"] + 2.0, ev
    assert last["val_loss"] < first["val_loss"], ev


def test_dpo_counts_dropped_pairs_and_reports(full_dpo):
    run, out = full_dpo
    assert out["data"]["train_rows"] == 1000
    assert out["data"]["train_dropped_identical_pair"] == 1 and out["data"]["train_dropped_too_long"] == 1
    report = json.loads((run / "metrics" / "report.json").read_text())
    assert report["beta"] == 0.1 and report["train_dropped_empty_response"] == 1
    assert "val_reward_accuracy" in report and (run / "hf" / "model.safetensors").is_file()


def test_lora_dpo_trains_only_adapters_against_the_base(sft_init, pairs, tmp_path):
    import torch.distributed.checkpoint as dcp

    from model.hf import load_hf
    from model.lora import LoraConfig, add_lora

    out = dpo(load_config(DpoConfig, "dpo-tiny", dpo_overrides(
        sft_init, pairs, tmp_path, "lora", **{"lora.enabled": True, "lora.rank": 8, "lora.alpha": 32.0,
                                              "lora.targets": "[wq, wk, wv, wo, w1, w2, w3]", "train.max_steps": 30,
                                              "train.lr": 3e-3, "run.eval_every": 30})))
    run = Path(out["run_dir"])
    ev = evals(run)
    assert abs(ev[0]["val_reward_margin"]) < 1e-3  # the base without adapter is the reference
    assert ev[-1]["val_reward_margin"] > 0.1 and ev[-1]["val_reward_accuracy"] > ev[0]["val_reward_accuracy"], ev
    model = add_lora(load_hf(sft_init)[0], LoraConfig(rank=8, alpha=32.0, targets=("wq", "wk", "wv", "wo", "w1",
                                                                                     "w2", "w3")))
    sd = model.state_dict()
    dcp.load({"model": sd}, checkpoint_id=str(out["checkpoint"]))
    base = load_hf(sft_init)[0].state_dict()
    for k, v in sd.items():
        if not k.endswith((".lora_a", ".lora_b")):
            torch.testing.assert_close(v, base[k.replace(".base.weight", ".weight")], rtol=0, atol=0)
    assert (run / "adapter" / "adapter.safetensors").is_file()
