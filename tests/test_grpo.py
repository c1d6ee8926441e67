"""GRPO (issue 13): the loss pieces against hand-computed values; the job on the tiny arithmetic policy — held-out
accuracy up over its start, weights synced in memory every batch, resume after a worker is killed — and bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

from core.config import ConfigError
from training.objectives.grpo import clipped_objective, group_advantages, grpo_loss, k3_kl, token_mean


# ------------------------------------------------------------------------------------------------ loss pieces


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # group: mean 0.5, std 0.5 → ±1; an all-equal group → 0; [1,0,0,0]: mean .25, std √(3/16) = .4330
    g = group_advantages(r, "group")
    assert torch.allclose(g[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(g[1], torch.zeros(4))
    assert torch.allclose(g[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / math.sqrt(3 / 16), atol=1e-5)
    assert torch.allclose(group_advantages(r, "no_std")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # leave-one-out: r_i minus the mean of the other three: 1 − 1/3, 0 − 2/3
    loo = group_advantages(r, "loo")
    assert torch.allclose(loo[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.allclose(loo[2], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="advantage mode"):
        group_advantages(r, "ppo")


def test_clipping_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_objective(logp, old, adv, clip_eps=0.2)
    # min(1.5, 1.2) = 1.2 (clipped); min(−1.5, −1.2) = −1.5; min(.5, .8) = .5; min(−.5, −.8) = −.8 (clipped)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_k3_kl_and_token_mean_by_hand():
    kl = k3_kl(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    assert torch.allclose(kl, torch.tensor([0.5 + math.log(0.5) * -1 - 1, 0.0]), atol=1e-6)  # e^d − d − 1, d=ln .5
    v, seq = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 2])
    assert token_mean(v, seq, 3, "token").item() == pytest.approx(2.0)
    assert token_mean(v, seq, 3, "sequence").item() == pytest.approx((1.5 + 3.0) / 2)  # row 1 has no token
    assert token_mean(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2, "token").item() == 0.0


def test_loss_masks_the_prompt_and_is_the_policy_gradient_on_policy():
    """With old_logp = the current log-probs (one update per batch) the loss is −mean(A) and its gradient that of
    −mean_t(A · logp_t) over the answer tokens only; prompt and padding positions never count."""
    from model.llama import ModelArgs, build_model
    from model.losses import IGNORE
    from training.objectives.finetune import answer_token_logprobs

    model = build_model(ModelArgs.from_name("tiny"), device="cpu", seed=0)
    tokens = torch.randint(0, 200, (2, 10))
    labels = torch.full((2, 10), IGNORE)
    labels[0, 6:] = tokens[0, 6:]  # row 0: 4 answer tokens after a 6-token prompt
    labels[1, 3:5] = tokens[1, 3:5]  # row 1: 2 answer tokens, then padding
    adv = torch.tensor([1.0, -2.0])
    with torch.no_grad():
        old, keep = answer_token_logprobs(model, tokens, labels)
    assert old.shape == (6,) and keep.sum() == 6
    batch = {"tokens": tokens, "labels": labels, "adv": adv, "old_logp": old,
             "stat_reward_mean": torch.tensor(0.25, dtype=torch.float64)}
    loss, stats = grpo_loss(model, batch, clip_eps=0.2, kl_coef=0.0, loss_norm="token")
    assert loss.item() == pytest.approx(-(4 * 1.0 + 2 * -2.0) / 6, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0 and stats["reward_mean"].item() == 0.25
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp, _ = answer_token_logprobs(model, tokens, labels)
    (-(torch.tensor([1.0] * 4 + [-2.0] * 2) * logp).mean()).backward()
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    # the prompt tokens do not matter: changing them changes no answer label, and the loss keeps its value
    # (they only enter as context), while a KL term to a reference adds β · KL ≥ 0
    model.zero_grad()
    loss_kl, stats = grpo_loss(model, {**batch, "ref_logp": old - 0.5}, clip_eps=0.2, kl_coef=0.1,
                               loss_norm="sequence")
    d = torch.tensor(-0.5)
    assert stats["kl"].item() == pytest.approx((torch.exp(d) - d - 1).item(), abs=1e-5)
    assert loss_kl.item() == pytest.approx(-(1.0 + -2.0) / 2 + 0.1 * stats["kl"].item(), abs=1e-5)


# ------------------------------------------------------------------------------------------------ bad input


def _files(tmp_path: Path, n_prompts: int = 64) -> dict[str, Path]:
    from tasks.arithmetic import problems

    out = {}
    for name, n, seed in (("prompts", n_prompts, 5), ("heldout", 128, 6)):
        out[name] = tmp_path / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(p.to_dict()) + "\n"
                                     for p in problems(n, seed=seed, digits=1, ops="+", prefix=name)))
    return out


def test_bad_config_is_refused(sft_trained, tmp_path):
    from core.config import load_config
    from jobs.grpo import GrpoConfig

    _, base = sft_trained
    f = _files(tmp_path)
    ok = [f"policy={base['export']}", f"prompts={f['prompts']}", f"run.storage={tmp_path}"]
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(GrpoConfig, "grpo-tiny", ok + ["grpo.group_size=1"])
    with pytest.raises(ConfigError, match="`prompts` is required"):
        load_config(GrpoConfig, "grpo-tiny", ok + ["prompts="])
    with pytest.raises(ConfigError, match="micro_batch_size=5"):
        load_config(GrpoConfig, "grpo-tiny", ok + ["train.micro_batch_size=5"])
    with pytest.raises(ConfigError, match="advantage must be one of"):
        load_config(GrpoConfig, "grpo-tiny", ok + ["grpo.advantage=ppo"])
    cfg = load_config(GrpoConfig, "grpo-tiny", ok)
    assert cfg.train.batch_size == cfg.grpo.prompts_per_step * cfg.grpo.group_size


def test_empty_prompt_file_and_foreign_reward_model_are_refused(sft_trained, sft_task, tmp_path):
    from jobs.grpo import check_reward_tokenizer, read_prompts
    from model.tokenizer import load_tokenizer

    _, base = sft_trained
    tok = load_tokenizer(base["export"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="has no prompts"):
        read_prompts(str(empty), tok, 256, 16)
    f = _files(tmp_path)
    with pytest.raises(ConfigError, match="no prompt short enough"):
        read_prompts(str(f["prompts"]), tok, 20, 16)
    # a reward model with another tokenizer (a fresh one with a smaller vocabulary)
    other = tmp_path / "other-tok"
    from model.tokenizer import SentencePieceTokenizer

    SentencePieceTokenizer.train([str(f["prompts"])], other, vocab_size=400, text_field="prompt")
    with pytest.raises(ConfigError, match="another tokenizer than the policy"):
        check_reward_tokenizer(str(other), tok, base["export"])
    check_reward_tokenizer(base["export"], tok, base["export"])  # its own tokenizer passes


# ------------------------------------------------------------------------------------------------ the job


def _grpo_cfg(base: dict, f: dict, tmp_path: Path, *extra: str):
    from core.config import load_config
    from jobs.grpo import GrpoConfig

    return load_config(GrpoConfig, "grpo-tiny", [
        f"policy={base['export']}", f"prompts={f['prompts']}", f"heldout={f['heldout']}", "heldout_size=128",
        f"run.storage={tmp_path}", "run.progress=false", "pool.engine=reference", *extra])


@pytest.mark.slow
def test_grpo_raises_heldout_accuracy_with_weights_synced_in_memory(sft_trained, tmp_path):
    """GRPO from the tiny SFT policy on one-digit sums: greedy held-out accuracy (128 problems, through the rollout
    actor) ends above the start; every batch after the first pushed new weights into the live actor (sync_s > 0,
    the engine's hash is the last push's tag, and no engine was restarted: the actor's pid is the same)."""
    import csv

    from jobs.grpo import grpo

    _, base = sft_trained
    f = _files(tmp_path, 256)
    out = grpo(_grpo_cfg(base, f, tmp_path, "run.name=grpo"))
    held = out["heldout"]
    assert held["after"] > held["before"], held
    rows = list(csv.DictReader((tmp_path / "grpo" / "metrics" / "metrics.csv").open()))
    assert len(rows) == 40
    assert float(rows[0]["sync_s"]) == 0.0 and all(float(r["sync_s"]) > 0 for r in rows[1:])
    assert all(float(r["policy_lag"]) == 0 for r in rows)  # on-policy: each batch sampled from the weights it trains
    for key in ("reward_mean", "reward_std", "pass_rate", "clip_frac", "entropy", "answer_len",
                "rollout_tokens_per_s"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert (tmp_path / "grpo" / "grpo.png").stat().st_size > 0
    assert (tmp_path / "grpo" / "metrics" / "report.md").exists()


@pytest.mark.slow
def test_killed_grpo_worker_resumes_at_its_checkpoint_with_the_prompt_position(sft_trained, tmp_path):
    """A worker SIGKILLed after step 14 (checkpoints every 5 steps): Ray Train restarts the group from step 10's
    checkpoint, which holds the prompt stream's position; the restarted source first pushes the checkpoint's
    weights into the rollout actor (sync at step 11), and the run ends at step 20 with every step's row.

    With grpo.overlap on: each batch after the first was sampled while the previous one trained, from weights one
    step old (policy_lag 1), except the first batch of each attempt (0: nothing was in flight); the batch in flight
    at step 10's checkpoint is not in its prompt position (the resumed run samples it again: 80 prompts in all),
    and no batch is started after the last step's."""
    import csv

    from jobs.grpo import grpo

    _, base = sft_trained
    f = _files(tmp_path, 64)
    out = grpo(_grpo_cfg(base, f, tmp_path, "run.name=resume", "train.max_steps=20", "run.ckpt_every=5",
                         "grpo.prompts_per_step=4", "grpo.group_size=4", "train.micro_batch_size=16",
                         "heldout_size=8", "run.callbacks=[tests.faults:kill_before_step_15]",
                         "grpo.overlap=true"))
    rd = tmp_path / "resume"
    assert (rd / "metrics" / "killed-at-15").exists()
    attempts = [json.loads(p.read_text()) for p in sorted((rd / "metrics").glob("attempt-*.json"))]
    assert [a["resumed_from_step"] for a in attempts] == [None, 10]
    rows = list(csv.DictReader((rd / "metrics" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert float(rows[10]["sync_s"]) > 0  # step 11: the checkpoint's weights went into the actor first
    assert [float(r["policy_lag"]) for r in rows] == [0.0] + [1.0] * 9 + [0.0] + [1.0] * 9
    from training.checkpointing import read_train_state

    state = read_train_state(Path(out["checkpoint"]))
    assert state["step"] == 20 and state["data"]["prompt_pos"] == 20 * 4


@pytest.mark.slow
def test_a_batch_without_signal_is_skipped_and_a_rewardless_run_stops(sft_trained, tmp_path):
    """A scorer that passes nothing (exact match of the bare number: the policy writes sentences): every group's
    rewards are equal, so every batch is skipped with a warning, and after grpo.max_skips in a row the run stops
    with an error saying so — no NaN, no update of the weights."""
    from jobs.grpo import grpo

    _, base = sft_trained
    f = _files(tmp_path, 64)
    cfg = _grpo_cfg(base, f, tmp_path, "run.name=nosignal", "scorer.kind=exact", "grpo.max_skips=2",
                    "grpo.prompts_per_step=2", "grpo.group_size=2", "train.micro_batch_size=4", "heldout=",
                    "run.max_failures=0")
    with pytest.raises(Exception, match="the reward gives no signal"):
        grpo(cfg)


@pytest.mark.slow
def test_pipeline_grpo_stage_from_an_earlier_sft(sft_trained, tmp_path):
    """stages=[grpo] in the pipeline: GRPO from the pipeline's SFT export on its RS prompts, held-out accuracy
    recorded like the other stages (in summary.json and summary.png)."""
    import shutil

    from core.config import load_config
    from jobs.pipeline import PipelineConfig, run

    _, base = sft_trained
    cfg = load_config(PipelineConfig, "pipeline-tiny", [
        f"storage={tmp_path}", "name=p", "stages=[grpo]", "serve.enabled=false",
        "grpo.train.max_steps=4", "grpo.pool.engine=reference", "grpo.heldout_size=16", "grpo.run.progress=false"])
    shutil.copytree(base["export"], tmp_path / "p" / "sft" / "hf")
    summary = run(cfg)
    grpo = summary["stages"]["grpo"]
    assert Path(grpo["export"]) == tmp_path / "p" / "grpo" / "hf"
    assert 0 <= grpo["heldout_accuracy"] <= 1 and set(grpo["in_job"]) >= {"before", "after"}
    assert summary["final_model"] == grpo["export"]
    assert (tmp_path / "p" / "summary.png").stat().st_size > 0


@pytest.mark.slow
def test_grpo_with_a_reward_model_scorer(sft_trained, tmp_path):
    """scorer.kind=reward_model: the rewards come from a reward model (the policy's trunk with a random scalar head,
    saved as `llamaray rm` exports it), so they are real numbers, not 0/1 verdicts; the run trains on them."""
    import csv

    from jobs.grpo import grpo
    from model.hf import load_hf
    from model.reward import RewardModel, save_reward_model

    _, base = sft_trained
    policy, tok = load_hf(base["export"])
    rm = RewardModel.from_policy(policy)
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    save_reward_model(rm, tok, tmp_path / "reward-model")
    f = _files(tmp_path, 64)
    grpo(_grpo_cfg(base, f, tmp_path, "run.name=rm", "scorer.kind=reward_model",
                   f"scorer.model={tmp_path / 'reward-model'}", "train.max_steps=3", "grpo.prompts_per_step=2",
                   "grpo.group_size=4", "train.micro_batch_size=8",
                   "heldout="))
    rows = list(csv.DictReader((tmp_path / "rm" / "metrics" / "metrics.csv").open()))
    assert len(rows) == 3
    assert all(float(r["reward_std"]) > 0 for r in rows)
    assert any(float(r["reward_mean"]) not in (0.0, 1.0) for r in rows)
