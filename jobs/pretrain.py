"""Pretrain a LLaMA-style model with FSDP2 on Ray Train.

Runbook::

    llamaray pretrain --config configs/tiny.yaml                      # CPU, 2 workers, embedded corpus
    python -m jobs.pretrain --config tiny --set run.name=exp1 --set train.max_steps=400
    ray job submit --working-dir . -- python -m jobs.pretrain --config llama-1b --set scaling.num_workers=8

What happens: config checks (sequence length vs context, corpus paths, empty corpus, batch divisibility, GPUs/CPUs
in the cluster) — all before any worker starts; then the corpus is cleaned, tokenized and packed (EOS between
documents) by Ray Data into parquet shards under ``<storage>/<name>/data`` (corpus.pipeline.prepare, reused when
unchanged); then ``scaling.num_workers`` Ray Train workers run jobs/train_loop.py. The training split reaches them
as a Ray Dataset (read shard by shard, ``train_dataset``) through ``ray.train.get_dataset_shard``: the streaming split deals blocks out,
no worker reads the whole split (jobs/data_stream.py); the small validation split is read by idx (ParquetRows).
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
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.storage import RunStore, check_uri, is_uri, resolve
from corpus.config import DataConfig
from core.config import ConfigError, job_arg_parser, load_config, to_dict
from jobs.data_stream import StreamRows
from jobs.train_loop import (LoopSpec, ParquetRows, PretrainObjective, RaySession, TrainConfig, fused_lm_loss,
                             run_worker)
from model.llama import ModelArgs


@dataclass
class RunSettings:
    """Where the run lives and how it checkpoints."""

    name: str = "pretrain-tiny"
    """Run name: the directory under ``storage``; rerunning with the same name resumes."""
    storage: str = "runs"
    """Parent of run directories: a path, a ``file://`` URI, or an object-store URI (``s3://bucket/runs``,
    ``gs://…``; pyarrow options in the query, e.g. ``?endpoint_override=host:9000&scheme=http`` for MinIO;
    credentials from the environment). A path must be one every worker sees (on a multi-node cluster a node-local
    path is refused before any worker starts); relative paths are relative to the current directory, except in a job
    started by ``ray job submit --working-dir``: there they resolve against $LLAMARAY_STORAGE (or ~/llamaray), never
    inside Ray's temporary copy of the working dir. A URI must be writable from every node (probed before any worker
    starts); each node stages its files under $LLAMARAY_STAGING (~/.cache/llamaray/staging) and the run's outputs,
    checkpoints included, end up under the URI, from which a rerun resumes on any machine (cluster/storage.py)."""
    ckpt_every: int = 50
    """Checkpoint every this many optimizer steps (and always at the end); 0 = only at the end."""
    eval_every: int = 50
    """Validation loss/perplexity every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints Ray Train keeps."""
    max_failures: int = 3
    """Worker-group restarts (from the latest checkpoint) before the run fails."""
    export: bool = True
    """Write the HF-format export ``<storage>/<name>/hf`` at the end."""
    address: str = ""
    """Ray cluster address; empty = RAY_ADDRESS or a local instance."""
    fail_at_step: int = 0
    """Fault injection for tests: the last worker SIGKILLs itself once at this step (0 = never)."""
    progress: bool = True
    """Show a tqdm progress bar on the driver."""
    record_consumed: bool = False
    """Test hook: every worker appends the idx of the rows of each step to <run>/metrics/consumed-*.jsonl."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"run.name must be a plain directory name, got {self.name!r}")
        if is_uri(self.storage):
            check_uri(self.storage)  # the scheme and bucket are named (no network: the preflight probes it)
        for k in ("ckpt_every", "eval_every", "max_failures", "fail_at_step"):
            if getattr(self, k) < 0:
                raise ConfigError(f"run.{k} must be >= 0, got {getattr(self, k)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


@dataclass
class ScalingSettings:
    """How many Ray Train workers and what each one holds."""

    num_workers: int = 2
    """Data-parallel FSDP workers (one GPU each when use_gpu)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL and bf16; otherwise CPU, gloo and fp32."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (Ray also sets the worker's OMP_NUM_THREADS to this: CPU-side work such as building
    the model before it moves to the GPU runs on that many threads)."""
    gpus_per_worker: float = 1.0
    """GPUs reserved per worker when use_gpu. A fraction (e.g. 0.5) lets a worker share its card with rollout actors
    that hold the rest (jobs/rs_rounds.py on one GPU: ``pool.num_gpus=0.5``); Ray only books the share, it does not
    cap memory, so the sharers must fit together. Above 1 it must be whole (each worker still trains on one device)."""
    autoscale_timeout_s: float = 900.0
    """On a cluster that can grow (an autoscaler config is found, cluster/capacity.py): how long the preflight waits
    for the autoscaler to add the nodes the workers need before it gives up with an error naming what it asked
    for and what arrived. 15 minutes covers a cloud GPU node's launch and setup; 0 = never wait (refuse at once, as
    on a fixed cluster). A job above the autoscaler's maximum is refused at once whatever this says."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        g = self.gpus_per_worker
        if not g > 0 or (g > 1 and g != int(g)):
            raise ConfigError(f"scaling.gpus_per_worker must be a fraction in (0, 1] or a whole number, "
                              f"got {self.gpus_per_worker}")
        if not self.autoscale_timeout_s >= 0:
            raise ConfigError(f"scaling.autoscale_timeout_s must be >= 0 seconds, got {self.autoscale_timeout_s}")
        if not self.use_gpu and self.gpus_per_worker != 1.0:
            raise ConfigError(f"scaling.gpus_per_worker={self.gpus_per_worker} needs scaling.use_gpu=true")

    def resources_per_worker(self) -> dict[str, float]:
        """What Ray Train reserves for each worker."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}


@dataclass
class PretrainConfig:
    """A pretraining run: model shape, data, optimisation, run bookkeeping, scaling."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs.from_name("tiny"))
    """Model shape: ``preset: tiny`` plus any ModelArgs field to override."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus sources and packing (corpus/config.py)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation (jobs/train_loop.py)."""
    run: RunSettings = field(default_factory=RunSettings)
    """Name, storage, checkpoints, evaluation."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    """Workers and devices."""

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is above the model's context "
                              f"(model.max_seq_len={self.model.max_seq_len})")
        self.train.grad_accum(self.scaling.num_workers)  # batch_size divisible by micro × workers


def run_store(run: RunSettings) -> RunStore:
    """The run directory ``<storage>/<name>`` (pretrain, SFT and DPO)."""
    return RunStore.open(run.storage, run.name)


def run_dir(cfg: PretrainConfig) -> Path:
    """The run directory as this process writes it: the directory itself, or its staging copy for a URI."""
    return run_store(cfg.run).local


def _train_fn(config: dict[str, Any]) -> None:
    run_worker(config["spec"], RaySession())


def check_cluster(run: RunSettings, scaling: ScalingSettings) -> None:
    """Connect to the run's cluster, check that every node sees the run's storage and that the cluster can place
    the workers (pretrain, SFT and DPO preflight); says on stderr where the results go. Where an autoscaler can add
    what is missing, it asks for it and waits up to ``scaling.autoscale_timeout_s`` (cluster.connect.check_resources).
    """
    from cluster.connect import check_resources, connect
    from cluster.storage import check_shared

    store = run_store(run)
    connect(run.address or None)
    check_shared(store.uri or store.local.parent)  # a URI: writable from here and readable from every node
    print(f"llamaray: run directory {store.location()}", file=sys.stderr, flush=True)
    check_resources(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, cpus_per_worker=scaling.cpus_per_worker,
                    gpus_per_worker=scaling.gpus_per_worker, timeout_s=scaling.autoscale_timeout_s)


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


def _make_source(path: str):
    return lambda: ParquetRows(path)


def _read_shard(batch: dict[str, Any]) -> Any:
    import pyarrow.parquet as pq

    fs, path = resolve(str(batch["path"][0]))  # a local path, or a URI read from any node
    return pq.read_table(path, filesystem=fs, columns=["idx", "tokens"])


def train_dataset(shards: str | Path | list[str]) -> Any:
    """The packed training split as a Ray Dataset of rows {idx, tokens}: one block per parquet shard, in file order.
    ``shards``: the split's directory, or its shard files (paths or URIs: ``RunStore.files``).

    Read by zero-CPU tasks over the file list rather than ``ray.data.read_parquet``: the Train workers may hold every
    CPU (2 workers × 1 CPU on 2 cores), and read_parquet's file-listing stage asks for a whole CPU, so it would never
    be scheduled ("Cluster resources are not enough to run any task from ReadFilesParquetV2"); reading a shard is
    light I/O."""
    import ray.data

    from corpus.pipeline import shard_files

    if not isinstance(shards, list):
        shards = shard_files(Path(shards))
    elif not shards:
        raise FileNotFoundError("no part-*.parquet shards in the training split (run corpus.pipeline.prepare first)")
    files = ray.data.from_items([{"path": f} for f in shards])
    return files.map_batches(_read_shard, batch_size=1, num_cpus=0)


def fit_on_ray(spec: LoopSpec, run: RunSettings, scaling: ScalingSettings,
               datasets: dict[str, Any] | None = None) -> Any:
    """``run_worker(spec)`` on Ray Train workers with the run's failure/checkpoint settings and a driver progress
    bar, labelled with the job (``spec.objective.name``), that follows rank 0's metrics.csv (Ray Train callbacks run
    in the controller, not here); returns the Ray Train Result. Shared by pretrain, SFT and DPO. ``datasets`` (Ray
    Datasets by name) are each split across the workers in order (``ray.train.get_dataset_shard(name)``)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from jobs.metrics import CsvProgress, parse_csv

    store = spec.store or run_store(run)
    # Ray Train replaces each dataset's execution options with these; preserve_order keeps the split deterministic
    data_config = ray.train.DataConfig(datasets_to_split=list(datasets), execution_options=ExecutionOptions(
        preserve_order=True)) if datasets else None
    trainer = TorchTrainer(
        _train_fn, train_loop_config={"spec": spec}, datasets=datasets, dataset_config=data_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=scaling.resources_per_worker()),
        run_config=ray.train.RunConfig(
            name=run.name, storage_path=store.ray_storage_path(),  # a URI: Ray Train's own pyarrow filesystem
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints)))
    stop = threading.Event()
    bar_thread = None
    if run.progress:
        read = functools.partial(store.read_text, "metrics/metrics.csv")  # a URI: rank 0's uploaded copy
        rows = parse_csv(read())
        bar = CsvProgress(read, spec.train.max_steps, start=int(rows[-1]["step"]) if rows else 0,
                          desc=spec.objective.name)

        def follow() -> None:
            while not stop.wait(1.0):
                bar.poll()
            bar.close()

        bar_thread = threading.Thread(target=follow, daemon=True)
        bar_thread.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if bar_thread:
            bar_thread.join(timeout=5)
    if result.error:
        raise result.error
    return result


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
        make_train_source=functools.partial(
            StreamRows, cfg.train.micro_batch_size, cfg.train.batch_size, num_rows=prepared.num_train,
            record_dir=str(rd / "metrics") if cfg.run.record_consumed else None),
        make_val_source=_make_source(str(prepared.val_dir)) if prepared.num_val else None,
        metrics_dir=str(rd / "metrics"), ckpt_every=cfg.run.ckpt_every, eval_every=cfg.run.eval_every,
        export_dir=str(rd / "hf") if cfg.run.export else None, tokenizer_dir=tok_dir,
        fail_at_step=cfg.run.fail_at_step, objective=PretrainObjective(fused_lm_loss),
        extra_report={"train_sequences": prepared.num_train, "val_sequences": prepared.num_val,
                      "seq_len": prepared.seq_len},
        store=store, inputs=(tok_dir, str(prepared.val_dir)))
    result = fit_on_ray(spec, cfg.run, cfg.scaling,
                        datasets={"train": train_dataset(store.files("data/train", "part-*.parquet"))})
    return {"run_dir": store.location(), "metrics": result.metrics, "checkpoint": checkpoint_location(result, store),
            "export": store.location("hf") if cfg.run.export else None, "tokenizer": store.location_of(tok_dir),
            "report": store.location("metrics/report.md")}


def checkpoint_location(result: Any, store: RunStore) -> str | None:
    """The latest checkpoint of a Ray Train result, as the user names it (a local path, or a URI)."""
    if result.checkpoint is None:
        return None
    return store.location(Path(result.checkpoint.path).name) if store.uri else result.checkpoint.path


def main(argv: list[str] | None = None) -> int:
    ap = job_arg_parser("llamaray pretrain", __doc__)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        out = pretrain(cfg)
    except ConfigError as e:
        print(f"llamaray pretrain: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
