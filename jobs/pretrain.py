"""Pretrain a LLaMA-style model with FSDP2 on Ray Train.

Runbook::

    llamaray pretrain --config configs/tiny.yaml                      # CPU, 2 workers, embedded corpus
    python -m jobs.pretrain --config tiny --set run.name=exp1 --set train.max_steps=400
    ray job submit --working-dir . -- python -m jobs.pretrain --config llama-1b --set scaling.num_workers=8

What happens: config checks (sequence length vs context, corpus paths, empty corpus, batch divisibility, GPUs/CPUs
in the cluster) — all before any worker starts; then the corpus is cleaned, tokenized and packed (EOS between
documents) by Ray Data into parquet shards under ``<storage>/<name>/data`` (corpus.pipeline.prepare, reused when
unchanged); then ``scaling.num_workers`` Ray Train workers run training/loop.py (through jobs/trainer.py). The
training split reaches them as a Ray Dataset (read shard by shard, ``train_dataset``) through
``ray.train.get_dataset_shard``: the streaming split deals blocks out, no worker reads the whole split (training/data_stream.py); the small validation split is read by idx (ParquetRows).
Outputs under ``<storage>/<name>/``: DCP checkpoints ``checkpoint_*``
(Ray Train keeps ``run.keep_checkpoints``), ``metrics/`` (metrics.csv, TensorBoard events, report.md, loss.png),
``hf/`` (HF Llama export that vLLM/transformers load).

Storage: ``run.storage`` is a path (a shared mount on a multi-node cluster) or an object-store URI
(``--set run.storage=s3://bucket/runs``): then every output above lands under ``s3://bucket/runs/<name>/``, written
from whichever node does the work — checkpoints by Ray Train, the prepared data by the driver (the Train workers
read the training split straight from the bucket), metrics/report/export by rank 0 — through a staging copy on each
node (cluster/storage.py says what moves when).

Resume: a worker death restarts the worker group from the latest checkpoint (``run.max_failures`` times); a dead
driver is resumed by rerunning the same command (same ``run.name`` and ``run.storage``), on any number of workers
and on any machine when the storage is a URI (the data, metrics and checkpoint come back from it).
The data position comes back too: the checkpoint stores which rows of the epoch are done and the restarted workers
skip them, so only the steps after the checkpoint are repeated; an epoch may drop its last < batch_size rows (plus
N mod workers rows that Ray's equal split leaves out).
Leaves out: tensor/pipeline parallelism, sequence packing masks (documents are
packed back to back, separated by EOS, attending across boundaries like GPT-2/LLaMA pretraining).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from core.config import ConfigError, run_job, to_dict
from corpus.config import DataConfig
from jobs.trainer import (RunSettings, ScalingSettings, check_cluster, checkpoint_location, fit_on_ray,
                          run_store, stream_rows, train_dataset)
from model.llama import ModelArgs
from training.data_stream import ParquetRows
from training.loop import LoopSpec, TrainConfig
from training.objectives.pretrain import PretrainObjective, fused_lm_loss


@dataclass
class PretrainConfig:
    """A pretraining run: model shape, data, optimisation, run bookkeeping, scaling."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs.from_name("tiny"))
    """Model shape: ``preset: tiny`` plus any ModelArgs field to override."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus sources and packing (corpus/config.py)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation (training/loop.py)."""
    run: RunSettings = field(default_factory=RunSettings)
    """Name, storage, checkpoints, evaluation."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    """Workers and devices."""

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is above the model's context "
                              f"(model.max_seq_len={self.model.max_seq_len})")
        self.train.grad_accum(self.scaling.num_workers)  # batch_size divisible by micro × workers


def preflight(cfg: PretrainConfig) -> None:
    """Every check that starts no worker: corpus paths, empty corpus, sequence length, cluster resources."""
    from corpus.pipeline import validate

    validate(cfg.data, max_seq_len=cfg.model.max_seq_len)
    check_cluster(cfg.run, cfg.scaling)


def prepare_data(cfg: PretrainConfig) -> tuple[Any, str]:
    """Tokenizer + packed splits under <run>/data; checks that the tokenizer fits the model's vocabulary."""
    from corpus.pipeline import ensure_tokenizer, prepare
    from model.hf import check_tokenizer_fits
    from model.tokenizer import load_tokenizer

    store = run_store(cfg.run)
    store.download("data")  # a URI run resumed on a fresh disk: its prepared data is reused, not redone
    data_dir = store.local / "data"
    tok_dir = ensure_tokenizer(cfg.data, data_dir, vocab_size=cfg.model.vocab_size)
    tok = load_tokenizer(tok_dir)
    try:
        check_tokenizer_fits(tok, cfg.model.vocab_size, f"tokenizer {tok_dir}")
    except ValueError as e:
        raise ConfigError(f"model.vocab_size: {e}") from e
    prepared = prepare(dataclasses.replace(cfg.data, tokenizer=tok_dir), data_dir, max_seq_len=cfg.model.max_seq_len)
    return prepared, tok_dir


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the final metrics and where things are."""
    preflight(cfg)
    prepared, tok_dir = prepare_data(cfg)
    if prepared.num_train < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is above the {prepared.num_train} training "
                          f"sequences the corpus packs into")
    store = run_store(cfg.run)
    rd = store.local
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    store.upload("data", "config.json")  # a URI run: before any worker starts, which reads them from there
    spec = LoopSpec(
        model_args=cfg.model, train=cfg.train,
        make_train_source=functools.partial(stream_rows, cfg.train.micro_batch_size, cfg.train.batch_size,
                                            num_rows=prepared.num_train),
        make_val_source=functools.partial(ParquetRows, str(prepared.val_dir)) if prepared.num_val else None,
        metrics_dir=str(rd / "metrics"), ckpt_every=cfg.run.ckpt_every, eval_every=cfg.run.eval_every,
        export_dir=str(rd / "hf") if cfg.run.export else None, tokenizer_dir=tok_dir,
        objective=PretrainObjective(fused_lm_loss),
        extra_report={"train_sequences": prepared.num_train, "val_sequences": prepared.num_val,
                      "seq_len": prepared.seq_len},
        store=store, inputs=(tok_dir, str(prepared.val_dir)))
    result = fit_on_ray(spec, cfg.run, cfg.scaling,
                        datasets={"train": train_dataset(store.files("data/train", "part-*.parquet"))})
    return {"run_dir": store.location(), "metrics": result.metrics, "checkpoint": checkpoint_location(result, store),
            "export": store.location("hf") if cfg.run.export else None, "tokenizer": store.location_of(tok_dir),
            "report": store.location("metrics/report.md")}


def main(argv: list[str] | None = None) -> int:
    return run_job("pretrain", __doc__, argv, PretrainConfig, pretrain)


if __name__ == "__main__":
    sys.exit(main())
