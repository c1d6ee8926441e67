"""LoRA wrapping/merging and the training objectives, on a small random model."""

import pytest
import torch

from model.llama import ModelArgs, build_model
from model.lora import LoraConfig, add_lora, has_lora, load_lora_state_dict, lora_state_dict, merge_lora
from model.losses import IGNORE, dpo_loss, next_token_loss, sequence_logprobs


def small_model(seed=0):
    return build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=101), seed=seed)


def test_lora_trains_only_adapters_and_merge_matches():
    model = add_lora(small_model(), LoraConfig(rank=4, alpha=8, targets=("wq", "wv", "w2")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # 2 tensors × 3 targets × 2 layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 101, (2, 9))
    for _ in range(3):
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, "only adapter tensors may change"
    with torch.no_grad():
        adapted = model(x)
        merged = merge_lora(model)
        assert not has_lora(merged)
        torch.testing.assert_close(merged(x), adapted, atol=1e-4, rtol=1e-4)
    assert set(merged.state_dict()) == set(small_model().state_dict())  # plain Llama names again


def test_adapter_state_roundtrip_and_mismatch():
    cfg = LoraConfig(rank=2)
    a = add_lora(small_model(), cfg)
    for p in lora_state_dict(a).values():
        assert p.numel() > 0
    b = add_lora(small_model(), cfg)
    load_lora_state_dict(b, lora_state_dict(a))
    for k, v in lora_state_dict(a).items():
        assert torch.equal(v, lora_state_dict(b)[k])
    c = add_lora(small_model(), LoraConfig(rank=3))
    with pytest.raises(ValueError, match="has shape"):
        load_lora_state_dict(c, lora_state_dict(a), source="adapter.safetensors")


@pytest.mark.parametrize(("kw", "msg"), [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"),
                                         ({"targets": ("q_proj",)}, "unknown")])
def test_lora_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoraConfig(**kw)


def test_masked_losses_ignore_prompt_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [1, 2, 3, 4, 5]])
    logp = torch.log_softmax(logits, -1)
    expected0 = logp[0, 2, 3] + logp[0, 3, 4]
    torch.testing.assert_close(sequence_logprobs(logits, labels)[0], expected0)
    flat = torch.cat([-logp[0, 2, 3:4], -logp[0, 3, 4:5], -logp[1].gather(-1, labels[1].unsqueeze(-1)).squeeze(-1)])
    torch.testing.assert_close(next_token_loss(logits, labels), flat.mean())


def test_dpo_loss_prefers_chosen():
    good = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    bad = dpo_loss(torch.tensor([-5.0]), torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    assert good.loss < bad.loss and good.accuracy == 1.0 and bad.accuracy == 0.0
    torch.testing.assert_close(good.reward_margin, torch.tensor(0.4))
    torch.testing.assert_close(good.loss, -torch.nn.functional.logsigmoid(torch.tensor(0.4)))


def test_head_on_answer_positions_only_equals_the_full_logits():
    """sft_loss and answer_logprobs give no logits to prompt and padding positions; values as from model(tokens)."""
    from training.objectives.finetune import answer_logprobs
    from training.objectives.sft import sft_loss

    torch.manual_seed(0)
    model = small_model()
    add_lora(model, LoraConfig(rank=4, targets=("wq", "wv")))
    tokens = torch.randint(0, 101, (4, 12))
    labels = torch.full((4, 12), IGNORE)
    labels[0, 5:9], labels[1, 2:3], labels[2, 7:] = tokens[0, 6:10], tokens[1, 3:4], 7  # ragged spans; row 3: none
    full_logits = model(tokens)
    fast, stats = sft_loss(model, {"tokens": tokens, "labels": labels})
    torch.testing.assert_close(fast, next_token_loss(full_logits, labels))
    assert stats == {}
    per_row = answer_logprobs(model, tokens, labels)
    torch.testing.assert_close(per_row, sequence_logprobs(full_logits, labels))
    assert per_row[3] == 0
    (fast + per_row.sum()).backward()
    assert model.layers[0].attention.wq.lora_b.grad is not None


def test_dpo_batch_loss_adds_the_chosen_answers_per_token_nll():
    from training.objectives.dpo import dpo_batch_loss

    torch.manual_seed(0)
    model = small_model()
    tokens = torch.randint(0, 101, (4, 10))  # rows 0-1 chosen, rows 2-3 rejected
    labels = torch.full((4, 10), IGNORE)
    labels[0, 3:6], labels[1, 4:5], labels[2, 3:7], labels[3, 2:4] = tokens[0, 4:7], tokens[1, 5:6], 9, 8
    batch = {"tokens": tokens, "labels": labels, "ref": torch.tensor([-20.0, -8.0, -30.0, -15.0])}
    with torch.no_grad():
        logp = sequence_logprobs(model(tokens), labels)
    plain, stats = dpo_batch_loss(model, batch, beta=0.1)
    regularised, stats_w = dpo_batch_loss(model, batch, beta=0.1, nll_weight=0.5)
    expected_nll = -(logp[0] + logp[1]) / 4  # 3 + 1 chosen answer tokens
    torch.testing.assert_close(stats["chosen_nll"], expected_nll)
    torch.testing.assert_close(plain, dpo_loss(logp[:2], logp[2:], batch["ref"][:2], batch["ref"][2:], 0.1).loss)
    torch.testing.assert_close(regularised, plain + 0.5 * expected_nll)
    torch.testing.assert_close(stats_w["dpo_loss"], plain.detach())
