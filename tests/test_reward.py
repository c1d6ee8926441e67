"""The reward model learns a synthetic preference; the log-likelihood fallback ranks a memorised answer first."""

import pytest
import torch

from model.llama import ModelArgs, build_model
from model.losses import next_token_loss
from model.reward import RewardModel, mean_logprob, pad_batch, pairwise_loss


def test_reward_model_learns_pairwise_preference():
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny", n_layers=2, vocab_size=64, dim=128, n_heads=2, n_kv_heads=1)
    rm = RewardModel.from_policy(build_model(args, seed=0))
    # Preference: answers ending in token 7 beat answers ending in token 9.
    def batch(n, gen):
        prompts = [torch.randint(10, 64, (int(gen.integers(3, 8)),)).tolist() for _ in range(n)]
        chosen, lc = pad_batch([p + [7] for p in prompts], 0)
        rejected, lr = pad_batch([p + [9] for p in prompts], 0)
        return chosen, lc, rejected, lr
    import numpy as np
    gen = np.random.default_rng(0)
    held = batch(32, gen)
    with torch.no_grad():
        _, acc0 = pairwise_loss(rm(*held[:2]), rm(*held[2:]))
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    for _ in range(30):
        c, lc, r, lr = batch(16, gen)
        loss, _ = pairwise_loss(rm(c, lc), rm(r, lr))
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        _, acc = pairwise_loss(rm(*held[:2]), rm(*held[2:]))
    assert acc0 <= 0.5 and acc >= 0.95


def test_mean_logprob_prefers_trained_answer():
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=50), seed=0)
    seq = torch.tensor([[1, 5, 6, 7, 8, 9]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = next_token_loss(model(seq[:, :-1]), seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert mean_logprob(model, [1, 5, 6], [7, 8, 9]) > mean_logprob(model, [1, 5, 6], [9, 8, 7])
    assert mean_logprob(model, [1], []) == float("-inf")


def test_reward_model_save_load_and_scorer_actor(tmp_path):
    """Round trip through disk, then the ScorerActor on a real Ray scores with both model-based kinds."""
    import ray

    from actors.scorers import ScorerActor, ScorerConfig
    from model.hf import CheckpointError
    from model.reward import load_reward_model, save_reward_model
    from model.tokenizer import SentencePieceTokenizer

    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(f"{a} + {b} = {a + b}" for a in range(40) for b in range(40)))
    tok = SentencePieceTokenizer.train([txt], vocab_size=300)
    policy = build_model(ModelArgs.from_name("tiny", n_layers=1, vocab_size=300), seed=0)
    rm = RewardModel.from_policy(policy)
    with torch.no_grad():
        rm.head.weight.normal_()
    save_reward_model(rm, tok, tmp_path / "rm")
    again = load_reward_model(tmp_path / "rm")
    x, lengths = pad_batch([[1, 5, 6], [1, 7]], 3)
    torch.testing.assert_close(again(x, lengths), rm(x, lengths))
    (tmp_path / "rm" / "reward_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="reward_head.safetensors"):
        load_reward_model(tmp_path / "rm")
    save_reward_model(rm, tok, tmp_path / "rm")

    from model.hf import save_hf
    save_hf(policy, tok, tmp_path / "policy")
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        messages = [{"role": "user", "content": "1 + 2 ="}]
        for kind, d in (("reward_model", tmp_path / "rm"), ("logprob", tmp_path / "policy")):
            actor = ScorerActor.remote(ScorerConfig(kind=kind, model=str(d)))
            [[a, b]] = ray.get(actor.score.remote([(messages, ["3", "1 + 2 = 3"])]))
            assert a.scorer == kind and isinstance(a.score, float) and a.score != b.score
    finally:
        ray.shutdown()
