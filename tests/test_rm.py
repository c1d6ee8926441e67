"""``llamaray rm`` end to end on CPU: 1 Ray Train worker (gloo, FSDP2), a synthetic preference task, from fresh
weights; the export is read by the ``reward_model`` scorer.

Task: one-digit additions (tasks/arithmetic.py); chosen = the well-formed worked answer ("3 + 2 = 5. The answer is
5."), rejected = the same words in a shuffled order. Held-out pairs come from another seed. One run of
STEPS steps; the reward model's FSDP2 sharding and its DCP checkpoint round trip (what a resume loads) are checked in
process on a one-rank gloo group, without a second Ray Train start (the loop's resume itself is shared with every
trainer and tested in tests/test_pretrain.py and test_sft.py).
Measured (1 worker, 16 pairs a step, lr 1e-3): held-out pair accuracy 0 at step 0 (zero head: all rewards tie)
→ 0.98 at step 10 → 1.0 at step 20 (64 held-out pairs; the module took ~56 s on the shared 2-core box). The bar
(≥ 0.8) fails with a sign-flipped loss (measured 0.0) or with rewards read at the BOS token (all tie: 0.0); reading
one token early is what test_row_lengths_end_at_the_last_labelled_token guards (shuffled words would still show).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, load_config
from jobs.rm import RmConfig, rm
from model.losses import IGNORE
from tasks.arithmetic import problems
from training.objectives.reward import row_lengths
from training.sft_data import write_jsonl

pytestmark = pytest.mark.timeout(600)

SMALL = ["model.preset=tiny", "model.dim=128", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.intermediate_size=344", "model.max_seq_len=256"]
STEPS = 20
BAD_PAIRS = [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4"},  # identical: dropped and counted
             {"prompt": "What is 2 + 2?", "chosen": "", "rejected": "5"}]  # empty answer


def shuffled(text: str, rng: random.Random) -> str:
    """The same words in another order (never the original)."""
    words = text.split()
    while True:
        out = rng.sample(words, len(words))
        if out != words:
            return " ".join(out)


def pair_rows(n: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": p.prompt, "chosen": p.solution, "rejected": shuffled(p.solution, rng)}
            for p in problems(n, seed=seed, digits=1, ops="+", prefix=prefix)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rm-pairs")
    train = pair_rows(600, 1, "math")
    return {"train": write_jsonl(train[:300] + BAD_PAIRS + train[300:], d / "train.jsonl"),
            "val": write_jsonl(pair_rows(64, 2, "val"), d / "val.jsonl"), "empty": write_jsonl([], d / "empty.jsonl")}


def config(sft_task, pairs, storage: Path, **extra) -> RmConfig:
    base = {"tokenizer": sft_task["tok"], "data.train": pairs["train"], "data.val": pairs["val"],
            "train.max_steps": STEPS, "train.batch_size": 16, "train.micro_batch_size": 16, "train.lr": 1e-3,
            "train.warmup_steps": 2, "scaling.num_workers": 1, "run.storage": storage, "run.name": "rm",
            "run.eval_every": 10, "run.ckpt_every": 0, "run.progress": False}
    base.update(extra)
    return load_config(RmConfig, "rm-tiny", SMALL + [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def trained(sft_task, pairs, tmp_path_factory) -> dict:
    """The rm() result of one run."""
    return rm(config(sft_task, pairs, tmp_path_factory.mktemp("rm-runs")))


def test_row_lengths_end_at_the_last_labelled_token():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, 8, 9, 2], [IGNORE, 4, IGNORE, IGNORE, IGNORE]])
    assert row_lengths(labels).tolist() == [4, 5, 2]


def test_rm_reaches_held_out_pair_accuracy(trained):
    run = Path(trained["run_dir"])
    evals = [json.loads(line) for line in (run / "metrics" / "eval.jsonl").read_text().splitlines()]
    by_step = {e["step"]: e for e in evals}
    assert by_step[0]["val_pair_accuracy"] == 0.0  # zero head: every reward is 0, ties count as wrong
    final = by_step[STEPS]
    print(f"held-out pair accuracy by step: { {s: round(e['val_pair_accuracy'], 3) for s, e in by_step.items()} }")
    assert final["val_pair_accuracy"] >= 0.8 and final["val_reward_margin"] > 0
    report = json.loads((run / "metrics" / "report.json").read_text())
    assert report["val_pair_accuracy"] == pytest.approx(final["val_pair_accuracy"])
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["train_rows"] == 600 and stats["train_dropped_identical_pair"] == 1
    assert stats["train_dropped_empty_response"] == 1


def test_reward_model_scorer_ranks_held_out_pairs(trained, pairs):
    from actors.scorers import ModelScorer, ScorerConfig
    from training.sft_data import read_rows

    rows = read_rows(str(pairs["val"]))
    grad = torch.is_grad_enabled()
    try:  # the scorer (an actor's class, here in process) turns autograd off for its process
        scorer = ModelScorer(ScorerConfig(kind="reward_model", model=trained["export"]))
        verdicts = scorer.score([([{"role": "user", "content": r["prompt"]}], [r["chosen"], r["rejected"]])
                                 for r in rows])
    finally:
        torch.set_grad_enabled(grad)
    wins = sum(c.score > r.score for c, r in verdicts)
    assert wins >= 0.8 * len(rows), f"the scorer ranks chosen first in {wins}/{len(rows)} held-out pairs"


def test_bad_inputs_are_refused_before_training(sft_task, pairs, tmp_path):
    from model.hf import save_hf
    from model.llama import ModelArgs, build_model

    with pytest.raises(ConfigError, match="no usable preference pair"):
        rm(config(sft_task, pairs, tmp_path, **{"data.train": pairs["empty"]}))
    small_vocab = save_hf(build_model(ModelArgs.from_name("tiny", dim=64, n_layers=1, n_heads=1, n_kv_heads=1,
                                                          vocab_size=64), seed=0), None, tmp_path / "init")
    with pytest.raises(ConfigError, match="tokenizer"):
        rm(config(sft_task, pairs, tmp_path, init=small_vocab))
    with pytest.raises(ConfigError, match="LoRA is not supported"):
        config(sft_task, pairs, tmp_path, **{"lora.enabled": "true"})
    with pytest.raises(ConfigError, match="packed rows are not supported"):
        config(sft_task, pairs, tmp_path, **{"data.pack": "true"})


def test_sharded_reward_model_checkpoint_round_trip(tmp_path):
    """apply_fsdp shards a RewardModel (its trunk's blocks, with activation checkpointing, and the root); a DCP
    checkpoint of it loads into a fresh sharded one (what a resume does), and the gathered full state is the
    RewardModel that save_reward_model writes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from model.llama import ModelArgs, build_model
    from model.reward import RewardModel
    from training import checkpointing
    from training.loop import param_groups
    from training.objectives.reward import reward_batch_loss
    from training.parallel import apply_fsdp

    args = ModelArgs.from_name("tiny", dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=32)
    batch = {"tokens": torch.randint(1, 64, (4, 9), generator=torch.Generator().manual_seed(0)),
             "labels": torch.full((4, 9), IGNORE)}
    batch["labels"][:, 4:7] = 5  # rows end at position 7

    def sharded() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = RewardModel.from_policy(build_model(args, seed=0))
        apply_fsdp(model, device_type="cpu", mesh=init_device_mesh("cpu", (1,)), activation_checkpointing="selective")
        return model, torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, opt = sharded()
        for _ in range(2):
            reward_batch_loss(model, batch)[0].backward()
            opt.step()
            opt.zero_grad()
        checkpointing.save(tmp_path / "ckpt", model, opt, {"step": 2, "consumed": 8}, rank=0)
        again, opt2 = sharded()
        assert checkpointing.load(tmp_path / "ckpt", again, opt2)["step"] == 2
        with torch.no_grad():
            lengths = row_lengths(batch["labels"])
            want = model(batch["tokens"], lengths)
            torch.testing.assert_close(again(batch["tokens"], lengths), want)
            plain = RewardModel(args)
            plain.load_state_dict(checkpointing.gather_full_state(again, rank=0), strict=True)
            torch.testing.assert_close(plain(batch["tokens"], lengths), want)
        assert float(want.abs().sum()) > 0  # the head trained away from its zero start
    finally:
        dist.destroy_process_group()
