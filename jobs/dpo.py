"""Direct preference optimisation (sigmoid DPO, full or LoRA) with FSDP2 on Ray Train.

Runbook::

    llamaray dpo --config configs/dpo-tiny.yaml --set init=runs/sft-tiny/hf --set data.train=runs/rs-tiny/round1/dpo.jsonl
    python -m jobs.dpo --config dpo-tiny --set lora.enabled=true --set beta=0.2

Data: JSONL/Parquet rows ``{prompt, chosen, rejected}`` (what jobs/rejection_sampling.py writes); ``messages`` (the
chat before the answer) may stand in for ``prompt``. Only the answer tokens are scored. Rows with an empty answer,
chosen == rejected, a bad schema or a rendering longer than the context are dropped and counted (training/sft_data.py).

Reference model: the starting weights (``init``). Its sequence log-probs of every chosen/rejected answer are computed
ONCE on the driver before the workers start and stored next to the rendered rows (``<run>/data/*.parquet``), so no
frozen copy is held during training. With LoRA the adapters start at zero (B = 0), so the base without adapter is
exactly that reference; both it and the policy score answers with training/objectives/finetune.answer_logprobs (the
output head on answer positions only, no full-vocabulary logits). Loss: −log σ(β·[(π_c − ref_c) − (π_r − ref_r)])
(model/losses.dpo_loss), plus ``nll_weight`` × the chosen answers' mean per-token NLL
(training/objectives/dpo.py: ``DpoObjective``, ``dpo_batch_loss``;
README has what it measured).
Metrics (train rows and, every ``run.eval_every`` steps, the held-out split → ``<run>/metrics/eval.jsonl``):
reward_margin, reward_accuracy (share of pairs whose implicit reward prefers chosen), chosen_logp, rejected_logp,
logp_margin (policy chosen − rejected log-prob), dpo_loss and chosen_nll (the two parts of the loss). Checkpoints,
resume, export (``hf/``, ``adapter/``) as in jobs/sft.py.
Packing (``--set data.pack=true``): pairs are packed into row pairs of up to ``data.max_len`` tokens each (chosen
row i and rejected row i hold the same pairs in the same order); the policy's log-probs are summed per segment, so
each pair's figures equal the unpacked ones, the reference's (scored packed on the driver) like the policy's.
Leaves out: the reference pass on the workers (the driver holds one full copy of the model for it: fine for small
models; for a 7B-class model precompute on a GPU node), IPO/hinge variants, length-normalised log-probs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from core.config import ConfigError, run_job
from jobs.finetune import FinetuneConfig, render_start, train_finetune
from jobs.trainer import RunSettings
from training.loop import TrainConfig
from training.objectives.dpo import DpoObjective, reference_logprobs


@dataclass
class DpoConfig(FinetuneConfig):
    """A DPO run: FinetuneConfig (starting = reference weights, preference pairs in ``data``, LoRA, optimisation,
    bookkeeping, scaling) plus β and the NLL weight, with DPO's defaults; ``train.batch_size`` counts pairs."""

    job: ClassVar[str] = "dpo"
    rows_what: ClassVar[str] = "preference"

    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-6, warmup_steps=10, weight_decay=0.0))
    """Optimisation; ``batch_size`` counts pairs."""
    run: RunSettings = field(default_factory=lambda: RunSettings(name="dpo-tiny", ckpt_every=0, eval_every=25))
    """Name, storage, checkpoints, evaluation cadence."""
    beta: float = 0.1
    """DPO β: how far the policy may move from the reference (higher = stays closer)."""
    nll_weight: float = 0.0
    """Weight of an NLL term on the chosen answers (mean per token) added to the DPO loss; Llama 3 used 0.2 (after
    Pang et al. 2024). It keeps the chosen answers' likelihood from falling while the margin grows."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.nll_weight >= 0:
            raise ConfigError(f"nll_weight must be >= 0, got {self.nll_weight}")


def dpo(cfg: DpoConfig) -> dict[str, Any]:
    """Run (or resume) a DPO job; returns final metrics and where the outputs are."""
    from model.hf import load_hf
    from model.llama import build_model
    from training.sft_data import render_pair, save_rendered

    st = render_start(cfg, render_pair, "preference pair")
    data_dir = st.rd / "data"
    if not (data_dir / "train.parquet").is_file():  # a rerun (resume) keeps the reference figures it started with
        ref_model = load_hf(st.init_dir, dtype=torch.float32)[0] if st.init_dir else \
            build_model(st.args, device="cpu", seed=cfg.train.seed)
        for name, r in (("train", st.train), ("val", st.val)):
            if r.rows:
                c, j = reference_logprobs(ref_model, r.rows, st.tok.pad_id or 0,
                                          pack_len=st.max_len if cfg.data.pack else 0)
                save_rendered(r, data_dir / f"{name}.parquet", DpoObjective.columns, {"ref_chosen": c, "ref_rejected": j})
        del ref_model
    return train_finetune(cfg, st, DpoObjective, beta=cfg.beta, nll_weight=cfg.nll_weight)


def main(argv: list[str] | None = None) -> int:
    return run_job("dpo", __doc__, argv, DpoConfig, dpo)


if __name__ == "__main__":
    sys.exit(main())
