"""A reward model: the LLaMA trunk with a scalar head on the last non-pad token, trained with a pairwise loss.

r(prompt, answer) = w · h_last + b. Training pushes r(chosen) above r(rejected): −log σ(r_c − r_r) (Bradley–Terry, as
in InstructGPT / Llama 2). Also here: the policy's own length-normalised log-likelihood, the cheap fallback scorer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.llama import ModelArgs, Transformer
from model.losses import IGNORE, sequence_logprobs


class RewardModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.trunk = Transformer(args)
        self.head = nn.Linear(args.dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: Transformer) -> "RewardModel":
        """Start from a language model's weights (the usual recipe); the LM head is kept but unused."""
        rm = cls(policy.args)
        rm.trunk.load_state_dict(policy.state_dict())
        return rm

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens (B, T) right-padded, lengths (B,) → rewards (B,), read at each row's last real token."""
        h = self.trunk.hidden_states(tokens)  # (B, T, dim)
        last = h[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # (B, dim)
        # = head(last).squeeze(-1), computed so the result is not a view (FSDP2 warns about a root returning one)
        return last.float() @ self.head.weight[0] + self.head.bias[0]


def pairwise_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, accuracy) of the Bradley–Terry objective on reward pairs (B,)."""
    return -F.logsigmoid(chosen - rejected).mean(), (chosen > rejected).float().mean()


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists → tokens (B, T), lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


def reward_tokens(tokenizer, messages: list[dict[str, str]], answer: str) -> list[int]:
    """The ids a reward model reads for ``answer`` after the chat ``messages``: the chat rendered with the answer as
    the assistant's turn (``render_chat``), without its last token — the row the trainer reads (the inputs of
    training/sft_data.render_answer), so the reward is read at the token the ``rm`` job trained it on."""
    ids, _ = tokenizer.render_chat(list(messages) + [{"role": "assistant", "content": answer}])
    return ids[:-1]


@torch.inference_mode()
def mean_logprob(model: Transformer, prompt: list[int], answer: list[int]) -> float:
    """The policy's length-normalised log-likelihood of ``answer`` after ``prompt`` (nats per token)."""
    if not answer:
        return float("-inf")
    ids = torch.tensor([prompt + answer])
    labels = torch.full_like(ids, IGNORE)
    labels[0, len(prompt):] = ids[0, len(prompt):]
    logits = model(ids[:, :-1])
    return float(sequence_logprobs(logits, labels[:, 1:])[0]) / len(answer)


HEAD_FILE = "reward_head.safetensors"


def save_reward_model(rm: RewardModel, tokenizer, out_dir) -> None:
    """An HF Llama directory for the trunk (so vLLM/transformers can read it) plus ``reward_head.safetensors``."""
    from pathlib import Path

    from safetensors.torch import save_file

    from model.hf import save_hf

    save_hf(rm.trunk, tokenizer, out_dir)
    save_file({"weight": rm.head.weight.detach().contiguous(), "bias": rm.head.bias.detach().contiguous()},
              str(Path(out_dir) / HEAD_FILE))


def load_reward_model(model_dir) -> RewardModel:
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from model.hf import CheckpointError, load_hf

    head_path = Path(model_dir) / HEAD_FILE
    if not head_path.exists():
        raise CheckpointError(f"{head_path}: missing — {model_dir} is not a reward model (save_reward_model writes it)")
    trunk, _ = load_hf(model_dir)
    rm = RewardModel(trunk.args)
    rm.trunk = trunk
    try:
        head = load_file(str(head_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{head_path}: unreadable safetensors ({e})") from e
    if set(head) != {"weight", "bias"} or tuple(head["weight"].shape) != (1, trunk.args.dim):
        raise CheckpointError(f"{head_path}: expected tensors weight (1, {trunk.args.dim}) and bias (1,), "
                              f"got { {k: tuple(v.shape) for k, v in head.items()} }")
    rm.head.load_state_dict(head)
    return rm
