"""Bradley–Terry reward-model training (full fine-tuning) with FSDP2 on Ray Train.

Runbook::

    llamaray rm --config configs/rm-tiny.yaml --set init=runs/sft-tiny/hf --set data.train=runs/rs-tiny/round1/dpo.jsonl
    python -m jobs.rm --config rm-tiny --set data.val=heldout-pairs.jsonl --set train.max_steps=300
    # then score with it: actors/scorers.ScorerConfig(kind="reward_model", model="runs/rm-tiny/hf")

Data: the DPO pair format — JSONL/Parquet rows ``{prompt, chosen, rejected}`` (RS's best/worst pairs,
``<rs run>/dpo.jsonl``, or a user's file); ``messages`` (the chat before the answer) may stand in for ``prompt``.
Rows with an empty answer, chosen == rejected, a bad schema or a rendering longer than the context are dropped and
counted (``<run>/data/stats.json`` and the report); a file with no usable pair is refused before any worker starts.
The held-out split is ``data.val`` or ``data.val_fraction`` of ``data.train``.

Model: ``model.reward.RewardModel.from_policy(init)`` — the policy's trunk plus a scalar head (zero at the start, so
every reward starts at 0 and the step-0 pair accuracy is 0: ties count as wrong). The reward of a chat is read at the
last input token of its rendered row (the chat with the answer, without its final token), the same token the
``reward_model`` scorer reads (training/objectives/reward.row_lengths, model/reward.reward_tokens). Loss: −log σ(r_chosen − r_rejected) (InstructGPT, Llama 2), every weight
trained (``lora.enabled`` is refused); ``train.batch_size`` counts pairs.
Metrics (train rows and, every ``run.eval_every`` steps, the held-out split → ``<run>/metrics/eval.jsonl``):
pair_accuracy (share of pairs with r_chosen > r_rejected), reward_margin, chosen_reward, rejected_reward; the last
held-out figures (``val_pair_accuracy`` …) are in ``metrics/report.json`` / ``report.md``. Checkpoints (DCP of the
sharded model + optimizer) and resume as in jobs/sft.py.
Export: ``<run>/hf`` — an HF Llama directory of the trunk (with the tokenizer) plus ``reward_head.safetensors``;
``model.reward.load_reward_model`` and the ``reward_model`` scorer load it.
Leaves out: LoRA, packed rows, margin / multi-answer ranking losses, reward normalisation (rewards are uncentred).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.config import ConfigError, run_job
from jobs.finetune import FinetuneConfig, render_start, train_finetune
from jobs.trainer import RunSettings
from training.loop import TrainConfig
from training.objectives.reward import RewardObjective


@dataclass
class RmConfig(FinetuneConfig):
    """A reward-model run: FinetuneConfig (starting weights of the trunk, preference pairs in ``data``, optimisation,
    bookkeeping, scaling) with the reward model's defaults; LoRA is refused and ``train.batch_size`` counts pairs."""

    job: ClassVar[str] = "rm"
    rows_what: ClassVar[str] = "preference"

    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, warmup_steps=10, weight_decay=0.0))
    """Optimisation; ``batch_size`` counts pairs."""
    run: RunSettings = field(default_factory=lambda: RunSettings(name="rm-tiny", ckpt_every=0, eval_every=25))
    """Name, storage, checkpoints, evaluation cadence; the export (``run.export``) goes to ``<run>/hf``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora.enabled:
            raise ConfigError("lora.enabled: llamaray rm trains every weight of the reward model; LoRA is not "
                              "supported (set lora.enabled=false)")
        if self.data.pack:
            raise ConfigError("data.pack: llamaray rm reads each reward at its row's last token, one pair per row; "
                              "packed rows are not supported (set data.pack=false)")


def rm(cfg: RmConfig) -> dict[str, Any]:
    """Run (or resume) a reward-model job; returns final metrics and where the outputs are (``export``: the reward
    model directory)."""
    from training.sft_data import render_pair, save_rendered

    st = render_start(cfg, render_pair, "preference pair")
    for name, r in (("train", st.train), ("val", st.val)):
        if r.rows:
            save_rendered(r, st.rd / "data" / f"{name}.parquet", RewardObjective.columns)
    return train_finetune(cfg, st, RewardObjective)


def main(argv: list[str] | None = None) -> int:
    return run_job("rm", __doc__, argv, RmConfig, rm)


if __name__ == "__main__":
    sys.exit(main())
