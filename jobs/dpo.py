"""Direct preference optimisation (sigmoid DPO, full or LoRA) with FSDP2 on Ray Train.

Runbook::

    llamaray dpo --config configs/dpo-tiny.yaml --set init=runs/sft-tiny/hf --set data.train=runs/rs-tiny/round1/dpo.jsonl
    python -m jobs.dpo --config dpo-tiny --set lora.enabled=true --set beta=0.2

Data: JSONL/Parquet rows ``{prompt, chosen, rejected}`` (what jobs/rejection_sampling.py writes); ``messages`` (the
chat before the answer) may stand in for ``prompt``. Only the answer tokens are scored. Rows with an empty answer,
chosen == rejected, a bad schema or a rendering longer than the context are dropped and counted (jobs/sft_data.py).

Reference model: the starting weights (``init``). Its sequence log-probs of every chosen/rejected answer are computed
ONCE on the driver before the workers start and stored next to the rendered rows (``<run>/data/*.parquet``), so no
frozen copy is held during training. With LoRA the adapters start at zero (B = 0), so the base without adapter is
exactly that reference; both it and the policy score answers with jobs/sft.answer_logprobs (the output head on
answer positions only, no full-vocabulary logits). Loss: −log σ(β·[(π_c − ref_c) − (π_r − ref_r)])
(model/losses.dpo_loss), plus ``nll_weight`` × the chosen answers' mean per-token NLL (jobs/sft.dpo_batch_loss;
README has what it measured).
Metrics (train rows and, every ``run.eval_every`` steps, the held-out split → ``<run>/metrics/eval.jsonl``):
reward_margin, reward_accuracy (share of pairs whose implicit reward prefers chosen), chosen_logp, rejected_logp,
logp_margin (policy chosen − rejected log-prob), dpo_loss and chosen_nll (the two parts of the loss). Checkpoints,
resume, export (``hf/``, ``adapter/``) as in jobs/sft.py.
Leaves out: the reference pass on the workers (the driver holds one full copy of the model for it: fine for small
models; for a 7B-class model precompute on a GPU node), IPO/hinge variants, length-normalised log-probs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.pretrain import RunSettings, ScalingSettings
from jobs.sft import (LoraSettings, SftData, answer_logprobs, render_start, require_local_inputs, run_job,
                      train_finetune)
from jobs.train_loop import TrainConfig
from core.config import ConfigError
from model.llama import ModelArgs


def _default_run() -> RunSettings:
    return RunSettings(name="dpo-tiny", ckpt_every=0, eval_every=25)


@dataclass
class DpoConfig:
    """A DPO run: starting (= reference) weights, preference pairs, β, LoRA, optimisation, bookkeeping, scaling."""

    init: str = ""
    """Starting and reference weights: HF Llama dir, .gguf file, or pretraining DCP checkpoint dir; empty = fresh."""
    tokenizer: str = ""
    """Tokenizer directory; empty = the one in ``init`` (required when ``init`` is empty)."""
    model: ModelArgs = field(default_factory=lambda: ModelArgs.from_name("tiny"))
    """Model shape, used only when ``init`` is empty."""
    data: SftData = field(default_factory=SftData)
    """Preference rows ({prompt|messages, chosen, rejected}); same fields as SFT data."""
    beta: float = 0.1
    """DPO β: how far the policy may move from the reference (higher = stays closer)."""
    nll_weight: float = 0.0
    """Weight of an NLL term on the chosen answers (mean per token) added to the DPO loss; Llama 3 used 0.2 (after
    Pang et al. 2024). It keeps the chosen answers' likelihood from falling while the margin grows."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (off = full fine-tuning)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-6, warmup_steps=10, weight_decay=0.0))
    """Optimisation; ``batch_size`` counts pairs."""
    run: RunSettings = field(default_factory=_default_run)
    """Name, storage, checkpoints, evaluation cadence."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    """Workers and devices."""

    def __post_init__(self) -> None:
        if not self.data.train:
            raise ConfigError("data.train: no preference file given (set data.train=FILE)")
        if not self.init and not self.tokenizer:
            raise ConfigError("tokenizer: with no init weights, name a tokenizer directory (tokenizer=DIR)")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.nll_weight >= 0:
            raise ConfigError(f"nll_weight must be >= 0, got {self.nll_weight}")
        require_local_inputs(self, "dpo")
        self.train.grad_accum(self.scaling.num_workers)


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, rows: list[tuple[list[int], ...]], pad_id: int,
                       batch_size: int = 16) -> tuple[list[float], list[float]]:
    """Sequence log-probs of the chosen and rejected answers under ``model`` (the frozen reference)."""
    from jobs.sft_data import pad_right
    from model.losses import IGNORE

    model.eval()
    out: list[list[float]] = [[], []]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        for side, (ci, cl) in enumerate(((0, 1), (2, 3))):
            tokens = pad_right([r[ci] for r in chunk], pad_id)
            labels = pad_right([r[cl] for r in chunk], IGNORE)
            out[side] += answer_logprobs(model, tokens, labels).tolist()
    return out[0], out[1]


def dpo(cfg: DpoConfig) -> dict[str, Any]:
    """Run (or resume) a DPO job; returns final metrics and where the outputs are."""
    from jobs.sft_data import render_pair, save_rendered
    from model.hf import load_hf
    from model.llama import build_model

    st = render_start(cfg.init, cfg.tokenizer, cfg.model, cfg.data, cfg.run, cfg.scaling, render_pair,
                      "preference pair")
    data_dir = st.rd / "data"
    cols = ("c_inputs", "c_labels", "r_inputs", "r_labels")
    if not (data_dir / "train.parquet").is_file():  # a rerun (resume) keeps the reference figures it started with
        ref_model = load_hf(st.init_dir, dtype=torch.float32)[0] if st.init_dir else \
            build_model(st.args, device="cpu", seed=cfg.train.seed)
        for name, r in (("train", st.train), ("val", st.val)):
            if r.rows:
                c, j = reference_logprobs(ref_model, r.rows, st.tok.pad_id or 0)
                save_rendered(r, data_dir / f"{name}.parquet", cols, {"ref_chosen": c, "ref_rejected": j})
        del ref_model
    return train_finetune("dpo", cfg, st, beta=cfg.beta, nll_weight=cfg.nll_weight)


def main(argv: list[str] | None = None) -> int:
    return run_job("llamaray dpo", __doc__, argv, DpoConfig, dpo)


if __name__ == "__main__":
    sys.exit(main())
