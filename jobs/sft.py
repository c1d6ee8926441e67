"""Supervised fine-tuning (full or LoRA) with FSDP2 on Ray Train.

Runbook::

    llamaray sft --config configs/sft-tiny.yaml --set init=runs/pretrain-tiny/hf --set data.train=train.jsonl
    python -m jobs.sft --config sft-smollm2 --set data.train=runs/rs/round1/sft.jsonl      # LoRA on SmolLM2-135M
    python -m jobs.sft --config sft-tiny --set lora.enabled=true --set lora.rank=16

Data: JSONL/Parquet rows ``{prompt, response}`` or chat ``{messages: [...]}`` (training/sft_data.py states the drop
rules; dropped rows are counted in ``<run>/data/stats.json`` and the report). Loss only on assistant tokens.
``init``: an HF Llama directory (our pretrain export ``runs/<name>/hf``, ``llamaray import`` output), a ``.gguf`` file
(imported into ``<run>/init`` first), or a pretraining DCP checkpoint directory (``checkpoint_*``, converted to
``<run>/init``); empty = fresh weights of ``model`` (smoke tests only).

What happens: config and data checks on the driver (files, schemas, tokenizer vs vocabulary, LoRA targets, cluster
resources) — before any worker starts; rows are rendered with the tokenizer's chat template into
``<run>/data/{train,val}.parquet``; ``scaling.num_workers`` Ray Train workers load ``init``, add LoRA adapters if
``lora.enabled`` (base frozen), shard with FSDP2 and train. Every ``run.eval_every`` steps: validation loss on the
held-out split and the task metric (greedy generation on ``eval.prompts`` held-out prompts, scored by the numeric
verifier or exact match) → ``<run>/metrics/eval.jsonl``, TensorBoard, report.
Outputs under ``<run>``: DCP checkpoints (resume: rerun the same command), ``metrics/``, ``hf/`` (merged HF weights
that vLLM loads), ``adapter/`` (``adapter.safetensors`` + ``adapter_config.json``, LoRA only). ``run.storage`` may be
an object-store URI as for pretraining (``s3://bucket/runs``: everything above, ``data/`` and ``init/`` included,
lands there and a rerun anywhere resumes from it); ``init``, ``tokenizer`` and the data files are read as local files
(paths every node sees), so a URI there is refused with what to do.

Training runs training/loop.run_worker, the loop pretraining uses, with ``SftObjective``
(training/objectives/sft.py): it starts from ``init`` and adds LoRA before sharding, adds the task metric to validation
and exports merged weights plus the adapter. What SFT shares with DPO on the driver is jobs/finetune.py.
Packing: ``--set data.pack=true`` packs several chats into each row of up to ``data.max_len`` tokens (document
mask, positions restarting per chat; see jobs/finetune.SftData.pack); by default rows are one chat each,
right-padded per micro-batch. ``real_token_share`` / ``real_tokens_per_s`` in metrics.csv show the padding.
Leaves out: a GPU attention kernel for packed rows (flex_attention / varlen; packed rows use SDPA with a boolean
mask, which on GPU falls back from the flash kernel), loading ``init`` straight into shards (each
worker reads the full HF weights, fine up to a few B parameters), ``init``/data straight from a bucket.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from core.config import ConfigError, run_job
from jobs.finetune import FinetuneConfig, render_start, task_prompts, train_finetune
from jobs.trainer import RunSettings
from training.loop import TrainConfig
from training.objectives.sft import SftObjective


@dataclass
class TaskEval:
    """The task metric: greedy generation on held-out prompts, scored against their reference."""

    metric: Literal["numeric", "exact", "none"] = "numeric"
    """numeric: last number of the answer == last number of the reference; exact: whitespace/case-normalised match."""
    prompts: int = 32
    """Held-out prompts generated per evaluation (the first N of the validation split)."""
    max_new_tokens: int = 48
    """Generation budget per prompt."""

    def __post_init__(self) -> None:
        if self.prompts < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"eval.prompts must be >= 0 and eval.max_new_tokens >= 1, got {self.prompts}, "
                              f"{self.max_new_tokens}")


@dataclass
class SftConfig(FinetuneConfig):
    """A fine-tuning run: FinetuneConfig (starting weights, data, LoRA, optimisation, bookkeeping, scaling) plus the
    task metric, with SFT's defaults."""

    job: ClassVar[str] = "sft"
    rows_what: ClassVar[str] = "training"

    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    """Optimisation (training/loop.py TrainConfig)."""
    run: RunSettings = field(default_factory=lambda: RunSettings(name="sft-tiny", ckpt_every=0, eval_every=50))
    """Name, storage, checkpoints, evaluation cadence."""
    eval: TaskEval = field(default_factory=TaskEval)
    """Task metric on held-out prompts."""


def sft(cfg: SftConfig) -> dict[str, Any]:
    """Run (or resume) an SFT job; returns final metrics and where the outputs are."""
    from training.sft_data import render_sft_row, save_rendered

    st = render_start(cfg, render_sft_row, "row")
    for name, r in (("train", st.train), ("val", st.val)):
        if r.rows:
            save_rendered(r, st.rd / "data" / f"{name}.parquet", SftObjective.columns)
    prompts, refs = ([], []) if cfg.eval.metric == "none" else task_prompts(
        [st.val_rows[i] for i in st.val.kept_index], st.tok, cfg.eval.prompts, st.args.max_seq_len,
        cfg.eval.max_new_tokens)
    return train_finetune(cfg, st, SftObjective, task_prompts=prompts, task_refs=refs, task_metric=cfg.eval.metric,
                          max_new_tokens=cfg.eval.max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    return run_job("sft", __doc__, argv, SftConfig, sft)


if __name__ == "__main__":
    sys.exit(main())
