"""The one FSDP2 training loop of pretrain, SFT and DPO; an ``Objective`` supplies what differs between them.

Worker shape (Ray's FSDP2 tutorial): device → build + shard (jobs/parallel.py) → restore the latest checkpoint if
any (``session.restore``) → loop → ``session.report(metrics, checkpoint_dir)``. The same ``run_worker`` runs under
Ray Train (``RaySession``, jobs/pretrain.fit_on_ray) and under plain ``torchrun`` (``LocalSession``,
bench/pretrain_mfu.py). The objective (``PretrainObjective`` here, ``FinetuneObjective`` in jobs/sft.py for SFT and
DPO) builds the starting model, computes the loss and its statistics, adds validation figures and exports; the loop
owns optimizer, schedule, accumulation, clipping, data position, metrics, evaluation cadence and checkpoints.

Decisions:
- Batch size is GLOBAL (sequences per optimizer step); gradient accumulation = batch_size / (micro × world), so the
  optimisation is the same on any number of workers and a run can resume on another world size.
- Data position, stored in the checkpoint: ``consumed`` (sequences, global) plus the source's own ``state()``.
  An idx-addressed source (SFT/DPO rows, benchmarks) needs only ``consumed``: step s reads rows consumed ..
  consumed + batch_size - 1 (mod the split size, i.e. epochs wrap), micro-batch a of rank r taking rows
  consumed + (a·world + r)·micro + [0, micro). Pretraining streams its rows through ``ray.train.get_dataset_shard``
  (jobs/data_stream.StreamRows: the checkpoint holds the set of rows done in the epoch). Either way a resume — on
  any world size — repeats only the steps after the checkpoint (jobs/data_stream.py says what an epoch can drop).
- Weight decay on the attention/MLP matrices (and an untied output head); none on RMSNorm gains and the token
  embedding (with tied embeddings that is also the head): decaying embedding rows of rare tokens only shrinks them.
- AdamW (fused on CUDA), linear warm-up then cosine decay to ``min_lr_ratio·lr``, gradient clipping by global norm;
  only parameters that require grad are optimised and clipped (LoRA: the adapters).
- ``ray.train.report`` is a barrier, so it is called only at checkpoint/eval steps and the end, not every step.
- Run storage (``spec.store``, cluster/storage.RunStore): with an object-store URI every worker first downloads the
  files it reads (``spec.inputs``) into its node's staging copy; rank 0 downloads ``metrics`` (the truth after a
  restart on any node), uploads it before each checkpoint/eval report — so the stored CSV always reaches the latest
  checkpoint — and uploads its whole copy (metrics, report, exports) at the end. For a path all of that is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.storage import RunStore
from core.config import ConfigError
from model.llama import ModelArgs

H100_BF16_PEAK = 989e12


@dataclass
class TrainConfig:
    """Optimisation settings of one training run."""

    max_steps: int = 200
    """Optimizer steps to run in total (a resumed run continues up to this step)."""
    batch_size: int = 16
    """Sequences per optimizer step, summed over all workers and accumulation steps."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one worker; batch_size must be a multiple of micro_batch_size × workers."""
    lr: float = 3e-3
    """Peak learning rate (after warm-up)."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr × min_lr_ratio at max_steps."""
    warmup_steps: int = 20
    """Linear warm-up steps from lr / warmup_steps to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on norms and the embedding)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    seed: int = 0
    """Seed of the weight initialisation."""
    compile: bool = False
    """torch.compile each transformer block (worth it on GPU; slow to start on CPU)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~1/3 more compute)."""
    eval_sequences: int = 32
    """Validation sequences per evaluation, at most the split (0: the whole split; rounded up to whole micro-batches
    per worker)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"train.batch_size={self.batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"train.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.eval_sequences < 0:
            raise ConfigError(f"train.eval_sequences must be >= 0, got {self.eval_sequences}")

    def grad_accum(self, world: int) -> int:
        per_step = self.micro_batch_size * world
        if self.batch_size % per_step:
            raise ConfigError(f"train.batch_size={self.batch_size} is not a multiple of train.micro_batch_size="
                              f"{self.micro_batch_size} × {world} worker(s) = {per_step}")
        return self.batch_size // per_step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine to lr·min_lr_ratio."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batch_indices(consumed: int, accum_step: int, rank: int, world: int, micro: int) -> np.ndarray:
    """Global row indices of one micro-batch: the step's rows consumed .. consumed + micro·world·accum - 1 are dealt
    out micro-batch by micro-batch, rank-major within each accumulation step (wrapping is the source's job)."""
    return consumed + (accum_step * world + rank) * micro + np.arange(micro)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------ data


class RowSource(Protocol):
    """Rows addressed by a global index (the parquet ``idx``); ``batch`` builds what the loss function takes."""

    num_rows: int

    def batch(self, indices: np.ndarray, device: torch.device) -> Any: ...


class ParquetRows:
    """Rows {idx, tokens} of a split written by corpus.pipeline.prepare, read shard by shard with pyarrow.

    Row i lives in the shard whose cumulative row range holds it (idx is contiguous from 0, files in name order);
    the last two shards read stay cached, which suits the sequential access of training.
    """

    def __init__(self, split_dir: str | Path) -> None:
        import pyarrow.parquet as pq

        self.files = sorted(str(p) for p in Path(split_dir).glob("part-*.parquet"))
        if not self.files:
            raise FileNotFoundError(f"{split_dir}: no part-*.parquet shards")
        counts = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_rows = int(self.starts[-1])
        self._cache: dict[int, np.ndarray] = {}

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._cache:
            import pyarrow.parquet as pq

            from jobs.data_stream import rows_from_arrow

            rows = rows_from_arrow(pq.read_table(self.files[i], columns=["idx", "tokens"]))
            idx = rows.idx
            if len(idx) and (idx[0] != self.starts[i] or idx[-1] != self.starts[i + 1] - 1):
                raise ValueError(f"{self.files[i]}: idx {idx[0]}..{idx[-1]} does not continue the previous shards "
                                 f"(expected {self.starts[i]}..{self.starts[i + 1] - 1})")
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = rows.tokens.astype(np.int64)
        return self._cache[i]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices) % self.num_rows
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return np.stack([self._shard(int(s))[int(i - self.starts[s])] for i, s in zip(indices, shard)])

    def batch(self, indices: np.ndarray, device: torch.device) -> Tensor:
        return torch.from_numpy(self.rows(indices)).to(device, non_blocking=True)  # (B, T+1)


class SyntheticRows:
    """Uniform random tokens (benchmarks: data loading is not what they measure); row i is the same everywhere."""

    def __init__(self, num_rows: int, seq_len: int, vocab_size: int) -> None:
        self.num_rows, self.seq_len, self.vocab_size = num_rows, seq_len, vocab_size

    def batch(self, indices: np.ndarray, device: torch.device) -> Tensor:
        g = torch.Generator().manual_seed(int(indices[0]))
        return torch.randint(0, self.vocab_size, (len(indices), self.seq_len + 1), generator=g).to(device)


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a (B, T+1) batch of token rows."""
    logits = model(batch[:, :-1])  # (B, T, V) float32
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def _head_ce(h: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    logits = h @ w.t()  # (B, T, V) in the compute dtype (bf16 on GPU)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


_head_ce_compiled = None


def fused_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The same loss as causal_lm_loss, with the output head + cross-entropy compiled together on CUDA, so the
    (B, T, V) float32 logits of Transformer.forward are never materialised (vocab 128k: 8 GB at 8 × 2048).

    Needs the root's parameters still gathered after ``hidden_states`` (jobs/parallel.apply_fsdp registers that
    method with FSDP and keeps the root unsharded after forward)."""
    global _head_ce_compiled
    h = model.hidden_states(batch[:, :-1])  # (B, T, dim)
    w = model.output.weight  # (V, dim); the gathered weight while the root is unsharded
    if h.is_cuda:
        if _head_ce_compiled is None:
            _head_ce_compiled = torch.compile(_head_ce)
        return _head_ce_compiled(h, w, batch[:, 1:])
    return _head_ce(h, w, batch[:, 1:])


# --------------------------------------------------------------------------------------------- sessions


class Session(Protocol):
    def device(self) -> torch.device: ...

    def restore(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None: ...

    def settle(self) -> None: ...

    def node_id(self) -> str: ...


class RaySession:
    """Ray Train: checkpoints go through ray.train.report; the latest comes back from ray.train.get_checkpoint."""

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


class LocalSession:
    """torchrun without Ray (benchmarks): no checkpoint store; reports are dropped."""

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        pass

    def settle(self) -> None:
        pass

    def node_id(self) -> str:
        return socket.gethostname()


# ------------------------------------------------------------------------------------------------ objectives


class Objective(Protocol):
    """What a role (pretrain, SFT, DPO) plugs into ``run_worker``; everything around these hooks is shared."""

    name: str
    """Job name: the progress bar's label and ``objective`` in the checkpoint's train_state.json."""

    def build_model(self, args: ModelArgs, train: TrainConfig) -> nn.Module:
        """The starting model on CPU, the same on every rank (run_worker moves and shards it)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """(mean loss of one micro-batch, scalar statistics averaged into the metrics row like the loss)."""

    def tokens(self, batch: Any) -> int:
        """Tokens the model runs on in this micro-batch (tokens/s, MFU)."""

    def seq_len(self, batch: Any) -> int:
        """Positions per row of this micro-batch: the T of MFU's attention FLOPs (ModelArgs.flops_per_token)."""

    def eval_extras(self, model: nn.Module, val: dict[str, float], w: Worker) -> dict[str, float]:
        """Collective: validation figures beyond ``val`` (``val_loss`` and ``val_<stat>``, averaged over ranks)."""

    def export(self, model: nn.Module, w: Worker) -> None:
        """Collective: write the run's outputs after the last step."""


@dataclass
class PretrainObjective:
    """Next-token prediction on packed (B, T+1) token rows, from seeded fresh weights; exports an HF directory."""

    loss_fn: Callable[[nn.Module, Tensor], Tensor] = causal_lm_loss
    """(model, batch) → scalar mean loss (causal_lm_loss, or fused_lm_loss on GPU)."""
    name: str = "pretrain"
    """Job name."""

    def build_model(self, args: ModelArgs, train: TrainConfig) -> nn.Module:
        from model.llama import build_model

        return build_model(args, device="cpu", seed=train.seed)

    def loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_fn(model, batch), {}

    def tokens(self, batch: Tensor) -> int:
        return batch[:, 1:].numel()

    def seq_len(self, batch: Tensor) -> int:
        return batch.shape[1] - 1

    def eval_extras(self, model: nn.Module, val: dict[str, float], w: Worker) -> dict[str, float]:
        return {"val_ppl": math.exp(min(val["val_loss"], 50))}

    def export(self, model: nn.Module, w: Worker) -> None:
        if w.spec.export_dir:
            from jobs.checkpointing import export_hf

            export_hf(model, w.spec.model_args, w.spec.tokenizer_dir, w.spec.export_dir, rank=w.rank)


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class LoopSpec:
    """Everything a worker needs; picklable (Ray sends it to each worker)."""

    model_args: ModelArgs
    """Model shape (also written into every checkpoint)."""
    train: TrainConfig
    """Optimisation settings."""
    make_train_source: Callable[[], RowSource]
    """Called on the worker: returns the training RowSource."""
    make_val_source: Callable[[], RowSource] | None = None
    """Called on the worker: returns the validation RowSource, or None for no validation."""
    objective: Objective = field(default_factory=PretrainObjective)
    """What is trained and how: PretrainObjective(loss_fn), or jobs/sft.FinetuneObjective for SFT and DPO."""
    metrics_dir: str | None = None
    """Where rank 0 writes CSV/TensorBoard/eval.jsonl/report (None: nowhere)."""
    ckpt_every: int = 0
    """Checkpoint every this many steps (0: only at the end, if ckpt_at_end)."""
    ckpt_at_end: bool = True
    """Checkpoint after the last step."""
    eval_every: int = 0
    """Validation every this many steps (0: only at the end, if a validation source exists)."""
    export_dir: str | None = None
    """Write an HF directory here at the end (None: no export)."""
    tokenizer_dir: str | None = None
    """Tokenizer (copied into the export; fine-tuning also generates with it)."""
    fail_at_step: int = 0
    """Test hook: the last rank SIGKILLs its own process once, at this step (0: never)."""
    log_every: int = 1
    """Metrics rows every this many steps."""
    write_report: bool = True
    """Rank 0 writes report.md + loss.png at the end (needs matplotlib)."""
    extra_report: dict[str, Any] = field(default_factory=dict)
    """More entries for report.json / report.md."""
    store: RunStore | None = None
    """The run directory (cluster/storage.RunStore) that metrics_dir/export_dir/tokenizer_dir live in; for a URI the
    workers sync their node's staging copy with it. None: plain shared paths (benchmarks)."""
    inputs: tuple[str, ...] = ()
    """Files or directories inside the run that every worker reads as local files (tokenizer, validation split,
    fine-tuning rows, init weights); downloaded first when the run lives at a URI."""


@dataclass
class Worker:
    """One running worker, as the objective's hooks see it."""

    spec: LoopSpec
    """The run."""
    device: torch.device
    """This worker's device."""
    rank: int
    """This worker's rank."""
    world: int
    """Number of workers."""
    tok: Any
    """The tokenizer of spec.tokenizer_dir (None without one)."""


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB → GB (process RSS high-water mark)


def _add(sums: dict[str, Tensor], values: dict[str, Tensor], weight: float = 1.0) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0) + v.detach().double() * weight


def _rank_mean(sums: dict[str, Tensor], world: int) -> dict[str, float]:
    """Collective: every value averaged over ranks (keys sorted, so every rank stacks them in the same order)."""
    import torch.distributed as dist

    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys])
    dist.all_reduce(vec)
    return {k: float(v) / world for k, v in zip(keys, vec)}  # float() waits for the device


def _evaluate(model: nn.Module, source: RowSource, w: Worker) -> dict[str, float]:
    """Collective: val_loss and val_<stat> over min(eval_sequences, split) rows (0: the whole split), + extras."""
    obj, micro = w.spec.objective, w.spec.train.micro_batch_size
    n = min(w.spec.train.eval_sequences or source.num_rows, source.num_rows)
    n_batches = max(1, math.ceil(n / (micro * w.world)))  # the same count on every rank (FSDP collectives)
    sums: dict[str, Tensor] = {}
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            loss, stats = obj.loss(model, source.batch(micro_batch_indices(0, b, w.rank, w.world, micro), w.device))
            _add(sums, {"loss": loss, **stats}, 1 / n_batches)
        out = {f"val_{k}": v for k, v in _rank_mean(sums, w.world).items()}
        out.update(obj.eval_extras(model, out, w))
    model.train()
    return out


def run_worker(spec: LoopSpec, session: Session) -> dict[str, Any]:
    """One worker's whole run (pretrain, SFT or DPO: ``spec.objective``); returns the final metrics (same on every
    rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from jobs import checkpointing
    from jobs.data_stream import as_train_source
    from jobs.metrics import MetricsWriter, write_report
    from jobs.parallel import apply_fsdp, init_process_group_if_needed, local_param_count
    from model.tokenizer import load_tokenizer

    device = session.device()
    init_process_group_if_needed(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, args, obj = spec.train, spec.model_args, spec.objective
    store = spec.store or RunStore(Path(spec.metrics_dir or "."))  # a path store: syncing does nothing
    store.download(*spec.inputs)  # this node's copy of what the worker reads as files (a URI run)
    accum = cfg.grad_accum(world)
    w = Worker(spec, device, rank, world, load_tokenizer(spec.tokenizer_dir) if spec.tokenizer_dir else None)

    model = obj.build_model(args, cfg).to(device)  # the same weights on every rank, then sharded
    apply_fsdp(model, device_type=device.type, mesh=init_device_mesh(device.type, (world,)), compile=cfg.compile,
               activation_checkpointing=cfg.activation_checkpointing)
    model.train()
    local, full = local_param_count(model)
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    trainable = sum(p.numel() for p in trained)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")

    step, consumed, resumed_from = 0, 0, None
    state: dict[str, Any] | None = None  # the checkpoint's train state, when resuming
    with session.restore() as ckpt_dir:
        if ckpt_dir is not None:
            state = checkpointing.load(ckpt_dir, model, opt)
            step, consumed, resumed_from = int(state["step"]), int(state["consumed"]), int(state["step"])
    train_src = as_train_source(spec.make_train_source(), rank, world, cfg.micro_batch_size)
    train_src.restore(state)
    val_src = spec.make_val_source() if spec.make_val_source else None
    writing = rank == 0 and spec.metrics_dir is not None
    if writing:
        store.download(spec.metrics_dir)  # a URI run: the stored metrics, wherever rank 0 ran before
    writer = MetricsWriter(spec.metrics_dir or ".", enabled=writing, resume_step=step)
    shard_info = torch.tensor([local], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(shard_info) for _ in range(world)]
    dist.all_gather(gathered, shard_info)
    shard_sizes = [int(t.item()) for t in gathered]
    node_ids: list[str] = [""] * world
    dist.all_gather_object(node_ids, session.node_id())
    eval_log = Path(spec.metrics_dir or ".", "eval.jsonl")
    if writing:  # one record per (re)start: who resumed from where, how it was sharded
        Path(spec.metrics_dir, f"attempt-{int(time.time() * 1000)}.json").write_text(json.dumps(
            {"world_size": world, "resumed_from_step": resumed_from, "consumed": consumed,
             "local_param_elements": shard_sizes, "full_param_elements": full, "node_ids": node_ids}))
        if step == 0:
            eval_log.unlink(missing_ok=True)
        store.upload(spec.metrics_dir)

    def evaluate(at: int) -> dict[str, float]:
        ev = _evaluate(model, val_src, w)
        if writing:
            with eval_log.open("a") as f:
                f.write(json.dumps({"step": at, **ev}) + "\n")
        return ev

    if val_src is not None and step == 0:  # the "before" figure
        evaluate(0)
    last: dict[str, Any] = {}
    while step < cfg.max_steps:
        step += 1
        if spec.fail_at_step and step == spec.fail_at_step and rank == world - 1 and spec.metrics_dir:
            marker = Path(spec.metrics_dir, f"killed-at-{step}")
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                session.settle()  # "killed after a checkpoint": let Ray finish registering the reported ones
                os.kill(os.getpid(), signal.SIGKILL)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        sums: dict[str, Tensor] = {}
        tokens = flops = 0.0
        for a in range(accum):
            batch = train_src.micro_batch(consumed, a, device)
            n = obj.tokens(batch)
            tokens, flops = tokens + n, flops + n * args.flops_per_token(obj.seq_len(batch))
            loss, stats = obj.loss(model, batch)
            (loss / accum).backward()
            _add(sums, {"loss": loss, **stats}, 1 / accum)
        gn = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        opt.step()
        opt.zero_grad(set_to_none=True)
        consumed += cfg.batch_size
        work = torch.tensor([tokens, flops], dtype=torch.float64, device=device)
        means = _rank_mean({**sums, "tokens": work[0], "flops": work[1]}, world)
        dt = time.perf_counter() - t0  # after _rank_mean: the step has finished
        tps, flops_per_s = means.pop("tokens") * world / dt, means.pop("flops") * world / dt
        mfu = flops_per_s / (H100_BF16_PEAK * world) if device.type == "cuda" else None
        row: dict[str, Any] = {"step": step, "loss": means.pop("loss"), "lr": lr, "grad_norm": float(gn),
                               "tokens_per_s": tps, "mfu": mfu, "peak_mem_gb": _peak_mem_gb(device),
                               "consumed": consumed, "world_size": world, "trainable_params": trainable, **means}
        final = step == cfg.max_steps
        if val_src is not None and ((spec.eval_every and step % spec.eval_every == 0) or final):
            row.update(evaluate(step))
        if step % spec.log_every == 0 or final or "val_loss" in row:
            writer.log(row)
        last = row
        reported = {k: v for k, v in row.items() if v is not None}
        at_ckpt = (spec.ckpt_every and step % spec.ckpt_every == 0) or (final and spec.ckpt_at_end)
        if writing and (at_ckpt or "val_loss" in row):
            store.upload(spec.metrics_dir)  # before the report: stored metrics reach every stored checkpoint
        if at_ckpt:
            state = {"step": step, "consumed": consumed, "world_size": world, "model": args.to_dict(),
                     "objective": obj.name, "data": train_src.state()}
            with tempfile.TemporaryDirectory(prefix="llamaray-ckpt-") as d:
                checkpointing.save(d, model, opt, state, rank=rank)
                session.report(reported, Path(d))
        elif "val_loss" in row:
            session.report(reported, None)

    obj.export(model, w)
    writer.close()
    if writing and last and spec.write_report:
        write_report(spec.metrics_dir, extra={**spec.extra_report, "world_size": world, "export_dir": spec.export_dir,
                                              "trainable_params": trainable,
                                              **{k: v for k, v in last.items() if k.startswith("val_")}})
    if writing:
        store.upload()  # metrics, report, exports: everything rank 0 wrote (a URI run)
    dist.barrier()
    return {**last, "shard_sizes": shard_sizes, "full_params": full, "world_size": world,
            "resumed_from_step": resumed_from}
