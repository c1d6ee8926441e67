"""The one training driver: pretrain, SFT and DPO (and the next objectives) run training/loop.run_worker on Ray Train
through here.

What it holds: the run and scaling settings every training config embeds (``RunSettings``, ``ScalingSettings``), the
cluster preflight (``check_cluster``), the Ray Train session the loop reports to (``RaySession``), the pretraining
split as a Ray Dataset and its per-worker stream (``train_dataset``, ``stream_rows``), ``fit_on_ray`` and the
commands' shared ``run_job``. It lives in jobs/ because it is the Ray side of the training commands (training/
never imports Ray; cluster/ only reaches and sizes a cluster and knows nothing of training).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from cluster.storage import RunStore, check_uri, is_uri, resolve
from core.config import ConfigError
from training.data_stream import StreamRows
from training.loop import LoopSpec, run_worker

if TYPE_CHECKING:
    import torch


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
    progress: bool = True
    """Show a tqdm progress bar on the driver."""
    callbacks: list[str] = field(default_factory=list)
    """Importable ``module:function`` paths called on every worker after every optimizer step as
    ``function(step, training.loop.StepContext)``; the tests install fault injection and data records this way
    (``run.callbacks=[tests.faults:kill_before_step_15]``). Empty for real runs."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"run.name must be a plain directory name, got {self.name!r}")
        if is_uri(self.storage):
            check_uri(self.storage)  # the scheme and bucket are named (no network: the preflight probes it)
        for k in ("ckpt_every", "eval_every", "max_failures"):
            if getattr(self, k) < 0:
                raise ConfigError(f"run.{k} must be >= 0, got {getattr(self, k)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        bad = [c for c in self.callbacks if c.count(":") != 1 or not all(c.split(":"))]
        if bad:
            raise ConfigError(f"run.callbacks must be module:function paths, got {bad}")


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


def run_store(run: RunSettings) -> RunStore:
    """The run directory ``<storage>/<name>`` (pretrain, SFT and DPO)."""
    return RunStore.open(run.storage, run.name)


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


class RaySession:
    """training/loop.Session on Ray Train: checkpoints go through ray.train.report; the latest comes back from
    ray.train.get_checkpoint."""

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as d:
                yield Path(d)

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

    def settle(self) -> None:
        """Block until Ray Train has processed every report made so far (the controller polls asynchronously)."""
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=120)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _train_fn(config: dict[str, Any]) -> None:
    run_worker(config["spec"], RaySession())


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


def stream_rows(micro_batch_size: int, batch_size: int, num_rows: int | None = None) -> StreamRows:
    """On a Ray Train worker: this worker's shard of the ``train`` dataset (``fit_on_ray(datasets=...)``) as
    training/data_stream.StreamRows (use through functools.partial as ``LoopSpec.make_train_source``)."""
    import ray.train

    return StreamRows(micro_batch_size, batch_size, ray.train.get_dataset_shard("train"), num_rows=num_rows)


def fit_on_ray(spec: LoopSpec, run: RunSettings, scaling: ScalingSettings,
               datasets: dict[str, Any] | None = None) -> Any:
    """``run_worker(spec)`` on Ray Train workers with the run's failure/checkpoint settings and a driver progress
    bar, labelled with the job (``spec.objective.name``), that follows rank 0's metrics.csv (Ray Train callbacks run
    in the controller, not here); returns the Ray Train Result. Shared by pretrain, SFT and DPO. ``run.callbacks``
    are added to the spec's. ``datasets`` (Ray Datasets by name; pretraining's ``{"train": train_dataset(...)}``,
    read on the workers with ``stream_rows``) are each split across the workers in order."""
    import dataclasses

    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    store = spec.store or run_store(run)
    spec = dataclasses.replace(spec, callbacks=(*spec.callbacks, *run.callbacks))
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
    with _progress(spec, store, run.progress):
        result = trainer.fit()
    if result.error:
        raise result.error
    return result


@contextlib.contextmanager
def _progress(spec: LoopSpec, store: RunStore, show: bool) -> Iterator[None]:
    """A driver progress bar labelled with the job that follows rank 0's metrics.csv while the context is open
    (Ray Train callbacks run in the controller, not here); nothing when ``show`` is false."""
    from training.metrics import CsvProgress, parse_csv

    if not show:
        yield
        return
    read = functools.partial(store.read_text, "metrics/metrics.csv")  # a URI: rank 0's uploaded copy
    rows = parse_csv(read())
    bar = CsvProgress(read, spec.train.max_steps, start=int(rows[-1]["step"]) if rows else 0,
                      desc=spec.objective.name)
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(1.0):
            bar.poll()
        bar.close()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def checkpoint_location(result: Any, store: RunStore) -> str | None:
    """The latest checkpoint of a Ray Train result, as the user names it (a local path, or a URI)."""
    if result.checkpoint is None:
        return None
    return store.location(Path(result.checkpoint.path).name) if store.uri else result.checkpoint.path
