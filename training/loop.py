"""The one FSDP2 training loop of pretrain, SFT and DPO; an ``Objective`` supplies what differs between them.

Worker shape (Ray's FSDP2 tutorial): device → build + shard (training/parallel.py) → restore the latest checkpoint
if any (``Checkpointer.restore``) → ``train_step`` after ``train_step`` → ``session.report(metrics, checkpoint_dir)``.
The same ``run_worker`` runs under Ray Train (``jobs.trainer.RaySession``, jobs/trainer.fit_on_ray) and under
plain ``torchrun`` (bench/pretrain_mfu.py's session); nothing here imports Ray. The objective (training/objectives/:
pretrain, sft, dpo) builds the starting model, computes the loss and its statistics, adds validation figures and
exports; the loop owns optimizer, schedule, accumulation, clipping, data position, metrics, evaluation cadence and
checkpoints. ``LoopSpec.callbacks`` (importable ``module:function`` paths) are called after every step: tests use
them to inject faults (tests/faults.py).

Decisions:
- Batch size is GLOBAL (sequences per optimizer step); gradient accumulation = batch_size / (micro × world), so the
  optimisation is the same on any number of workers and a run can resume on another world size.
- Data position, stored in the checkpoint: ``consumed`` (sequences, global) plus the source's own ``state()``.
  An idx-addressed source (SFT/DPO rows, benchmarks) needs only ``consumed``: step s reads rows consumed ..
  consumed + batch_size - 1 (mod the split size, i.e. epochs wrap), micro-batch a of rank r taking rows
  consumed + (a·world + r)·micro + [0, micro). Pretraining streams its rows through ``ray.train.get_dataset_shard``
  (training/data_stream.StreamRows: the checkpoint holds the set of rows done in the epoch). Either way a resume —
  on any world size — repeats only the steps after the checkpoint (training/data_stream.py says what an epoch can
  drop).
- Weight decay on the attention/MLP matrices (and an untied output head); none on RMSNorm gains and the token
  embedding (with tied embeddings that is also the head): decaying embedding rows of rare tokens only shrinks them.
- MFU against the device's dense BF16 peak (training/flops.py); unknown devices: no MFU, never a wrong one.
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
import importlib
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
from torch import Tensor, nn

from cluster.storage import RunStore
from core.config import ConfigError
from model.llama import ModelArgs
from training.data_stream import RowSource, TrainSource, as_train_source, micro_batch_indices


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
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Per transformer block (training/parallel.AC_MODES): none; full (keep only each block's input, recompute it
    all in backward: least memory, ~1/3 more compute); selective (keep matmul and attention outputs, recompute only
    the elementwise ops — norms, SwiGLU, RoPE, residual adds: frees their activations for little recompute)."""
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]



# --------------------------------------------------------------------------------------------- sessions


class Session(Protocol):
    """What the loop asks of the system it runs under (jobs/trainer.RaySession; a benchmark's torchrun session)."""

    def device(self) -> torch.device:
        """This worker's device."""

    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest checkpoint's directory while the context is open (None: none yet)."""

    def report(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        """Collective: hand over a metrics row and, with ``ckpt_dir``, the checkpoint written there."""

    def settle(self) -> None:
        """Block until every report made so far has been taken in (tests kill a worker only after that)."""

    def node_id(self) -> str:
        """The node this worker runs on."""



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

    def real_tokens(self, batch: Any) -> int:
        """The non-padding tokens among them (real_tokens_per_s, real_token_share)."""

    def seq_len(self, batch: Any) -> int:
        """Positions per row of this micro-batch: the T of MFU's attention FLOPs (ModelArgs.flops_per_token)."""

    def eval_extras(self, model: nn.Module, val: dict[str, float], w: Worker) -> dict[str, float]:
        """Collective: validation figures beyond ``val`` (``val_loss`` and ``val_<stat>``, averaged over ranks)."""

    def export(self, model: nn.Module, w: Worker) -> None:
        """Collective: write the run's outputs after the last step."""


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class LoopSpec:
    """Everything a worker needs; picklable (Ray sends it to each worker)."""

    model_args: ModelArgs
    """Model shape (also written into every checkpoint)."""
    train: TrainConfig
    """Optimisation settings."""
    make_train_source: Callable[[], RowSource | TrainSource]
    """Called on the worker: returns the training rows (an idx-addressed RowSource, or a TrainSource such as
    StreamRows)."""
    objective: Objective
    """What is trained and how: training/objectives (PretrainObjective, SftObjective, DpoObjective)."""
    make_val_source: Callable[[], RowSource] | None = None
    """Called on the worker: returns the validation RowSource, or None for no validation."""
    metrics_dir: str | None = None
    """Where rank 0 writes CSV/TensorBoard/eval.jsonl/report (None: nowhere)."""
    ckpt_every: int = 0
    """Checkpoint every this many steps (0: only at the end, if ckpt_at_end)."""
    ckpt_at_end: bool = True
    """Checkpoint after the last step. Every job does; bench/pretrain_mfu.py turns it off because it measures steps
    and a 1B model's final checkpoint (weights + AdamW state, ~12 GB) would only cost it time and disk."""
    eval_every: int = 0
    """Validation every this many steps (0: only at the end, if a validation source exists)."""
    export_dir: str | None = None
    """Write an HF directory here at the end (None: no export)."""
    tokenizer_dir: str | None = None
    """Tokenizer (copied into the export; fine-tuning also generates with it)."""
    log_every: int = 1
    """Metrics rows every this many steps."""
    write_report: bool = True
    """Rank 0 writes report.md + loss.png at the end (needs matplotlib)."""
    extra_report: dict[str, Any] = field(default_factory=dict)
    """More entries for report.json / report.md."""
    store: RunStore | None = None
    """The run directory (cluster/storage.RunStore) that metrics_dir/export_dir/tokenizer_dir live in; for a URI the
    workers sync their node's staging copy with it. None: plain shared paths (benchmarks)."""
    callbacks: tuple[str, ...] = ()
    """Importable ``module:function`` paths, each called as ``function(step, StepContext)`` on every rank after every
    optimizer step (after its metrics row and checkpoint); tests install fault injection and data records this way
    (tests/faults.py). Resolved on the worker."""
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
    session: Session
    """Where checkpoints go and come from (Ray Train, or a benchmark's)."""


@dataclass
class StepContext:
    """What a ``LoopSpec.callbacks`` function sees after a step."""

    worker: Worker
    """The running worker (spec, rank, world, session)."""
    source: TrainSource
    """The training source (StreamRows: ``step_idx`` and ``epoch`` are the rows of the step just done)."""
    row: dict[str, Any]
    """The step's metrics row."""


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


def train_step(model: nn.Module, opt: torch.optim.Optimizer, source: TrainSource, w: Worker, step: int,
               consumed: int, peak: float | None) -> dict[str, Any]:
    """Collective: optimizer step ``step`` (1-based) on the rows after ``consumed``: learning rate, gradient
    accumulation over micro-batches, clipping, AdamW; returns its metrics row (every value averaged over ranks)."""
    cfg, obj, world, device = w.spec.train, w.spec.objective, w.world, w.device
    accum = cfg.grad_accum(world)
    lr = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    t0 = time.perf_counter()
    sums: dict[str, Tensor] = {}
    tokens = real = flops = 0.0
    for a in range(accum):
        batch = source.micro_batch(consumed, a, device)
        n = obj.tokens(batch)
        tokens, flops = tokens + n, flops + n * w.spec.model_args.flops_per_token(obj.seq_len(batch))
        real += obj.real_tokens(batch)
        loss, stats = obj.loss(model, batch)
        (loss / accum).backward()
        _add(sums, {"loss": loss, **stats}, 1 / accum)
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    gn = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
    opt.step()
    opt.zero_grad(set_to_none=True)
    work = torch.tensor([tokens, real, flops], dtype=torch.float64, device=device)
    means = _rank_mean({**sums, "tokens": work[0], "real_tokens": work[1], "flops": work[2]}, world)
    dt = time.perf_counter() - t0  # after _rank_mean: the step has finished
    share = means.pop("real_tokens") / means["tokens"]
    tps, flops_per_s = means.pop("tokens") * world / dt, means.pop("flops") * world / dt
    return {"step": step, "loss": means.pop("loss"), "lr": lr, "grad_norm": float(gn), "tokens_per_s": tps,
            "real_tokens_per_s": tps * share, "real_token_share": share,
            "mfu": flops_per_s / (peak * world) if peak else None, "peak_mem_gb": _peak_mem_gb(device),
            "consumed": consumed + cfg.batch_size, "world_size": world,
            "trainable_params": sum(p.numel() for p in trained), **means}


class Checkpointer:
    """When and what a worker checkpoints: DCP model + optimizer shards and ``train_state.json`` (step, consumed
    rows, world size, model shape, objective, the source's data position), handed to the session (Ray Train keeps
    them); and the restore of the latest one."""

    def __init__(self, w: Worker) -> None:
        self.w = w

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The latest checkpoint's train state, its weights and optimizer state loaded into ``model``/``opt``;
        None when the run starts fresh."""
        from training import checkpointing

        with self.w.session.restore() as ckpt_dir:
            return None if ckpt_dir is None else checkpointing.load(ckpt_dir, model, opt)

    def due(self, step: int) -> bool:
        spec = self.w.spec
        return bool((spec.ckpt_every and step % spec.ckpt_every == 0)
                    or (step == spec.train.max_steps and spec.ckpt_at_end))

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, source: TrainSource, row: dict[str, Any],
             reported: dict[str, Any]) -> None:
        """Collective: write the checkpoint of the step in ``row`` and report it with ``reported``."""
        from training import checkpointing

        w = self.w
        state = {"step": row["step"], "consumed": row["consumed"], "world_size": w.world,
                 "model": w.spec.model_args.to_dict(), "objective": w.spec.objective.name, "data": source.state()}
        with tempfile.TemporaryDirectory(prefix="llamaray-ckpt-") as d:
            checkpointing.save(d, model, opt, state, rank=w.rank)
            w.session.report(reported, Path(d))


def load_callbacks(paths: tuple[str, ...] | list[str]) -> list[Callable[[int, StepContext], None]]:
    """``module:function`` paths → the functions (a ConfigError names a path that does not resolve)."""
    out = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"run.callbacks: cannot load {path!r} (expected module:function): {e}") from e
    return out


def _setup(spec: LoopSpec, session: Session) -> Worker:
    """The process group and this worker's device; the run's input files on this node."""
    import torch.distributed as dist

    from model.tokenizer import load_tokenizer
    from training.parallel import init_process_group_if_needed

    device = session.device()
    init_process_group_if_needed(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    store = spec.store or RunStore(Path(spec.metrics_dir or "."))  # a path store: syncing does nothing
    store.download(*spec.inputs)  # this node's copy of what the worker reads as files (a URI run)
    tok = load_tokenizer(spec.tokenizer_dir) if spec.tokenizer_dir else None
    return Worker(spec, device, dist.get_rank(), dist.get_world_size(), tok, session)


def _build(w: Worker) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The objective's starting model, moved to the device and sharded (FSDP2), and its AdamW."""
    from torch.distributed.device_mesh import init_device_mesh

    from training.parallel import apply_fsdp

    cfg, device = w.spec.train, w.device
    model = w.spec.objective.build_model(w.spec.model_args, cfg).to(device)  # the same weights on every rank
    apply_fsdp(model, device_type=device.type, mesh=init_device_mesh(device.type, (w.world,)), compile=cfg.compile,
               activation_checkpointing=cfg.activation_checkpointing)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")
    return model, opt


def _record_attempt(w: Worker, model: nn.Module, step: int, consumed: int, resumed_from: int | None,
                    writing: bool) -> tuple[list[int], int]:
    """Collective: (elements of each rank's shard, full parameter count); rank 0 writes ``attempt-<ms>.json``, one
    record per (re)start: who resumed from where, how it was sharded, on which nodes."""
    import torch.distributed as dist

    from training.parallel import local_param_count

    local, full = local_param_count(model)
    shard_info = torch.tensor([local], dtype=torch.float64, device=w.device)
    gathered = [torch.zeros_like(shard_info) for _ in range(w.world)]
    dist.all_gather(gathered, shard_info)
    shard_sizes = [int(t.item()) for t in gathered]
    node_ids: list[str] = [""] * w.world
    dist.all_gather_object(node_ids, w.session.node_id())
    if writing:
        Path(w.spec.metrics_dir, f"attempt-{int(time.time() * 1000)}.json").write_text(json.dumps(
            {"world_size": w.world, "resumed_from_step": resumed_from, "consumed": consumed,
             "local_param_elements": shard_sizes, "full_param_elements": full, "node_ids": node_ids}))
    return shard_sizes, full


def _peak(w: Worker) -> float | None:
    """The device's dense BF16 peak for MFU (None: CPU or an unknown card); rank 0 says once which one it uses."""
    from training.flops import peak_flops

    if w.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(w.device)
    peak = peak_flops(name)
    if w.rank == 0:
        print(f"llamaray: MFU against {name}'s dense BF16 peak, {peak / 1e12:.0f} TFLOP/s per device" if peak else
              f"llamaray: no dense BF16 peak known for {name!r} (training/flops.py): MFU is not reported",
              file=sys.stderr, flush=True)
    return peak


def run_worker(spec: LoopSpec, session: Session) -> dict[str, Any]:
    """One worker's whole run (pretrain, SFT or DPO: ``spec.objective``); returns the final metrics (same on every
    rank)."""
    import torch.distributed as dist

    from training.metrics import MetricsWriter, write_report

    w = _setup(spec, session)
    spec.train.grad_accum(w.world)  # refuse a batch that does not split over these workers before building
    store = spec.store or RunStore(Path(spec.metrics_dir or "."))
    model, opt = _build(w)
    ckpt = Checkpointer(w)
    state = ckpt.restore(model, opt)
    step, consumed = (int(state["step"]), int(state["consumed"])) if state else (0, 0)
    resumed_from = step if state else None
    train_src = as_train_source(spec.make_train_source(), w.rank, w.world, spec.train.micro_batch_size)
    if hasattr(train_src, "bind_policy"):  # an on-policy source (jobs/grpo.RolloutSource) samples from the model
        train_src.bind_policy(model, w)
    train_src.restore(state)
    val_src = spec.make_val_source() if spec.make_val_source else None
    callbacks = load_callbacks(spec.callbacks)
    writing = w.rank == 0 and spec.metrics_dir is not None
    if writing:
        store.download(spec.metrics_dir)  # a URI run: the stored metrics, wherever rank 0 ran before
    writer = MetricsWriter(spec.metrics_dir or ".", enabled=writing, resume_step=step)
    shard_sizes, full = _record_attempt(w, model, step, consumed, resumed_from, writing)
    eval_log = Path(spec.metrics_dir or ".", "eval.jsonl")
    if writing:
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
    peak = _peak(w)
    last: dict[str, Any] = {}
    while step < spec.train.max_steps:
        step += 1
        row = train_step(model, opt, train_src, w, step, consumed, peak)
        consumed = row["consumed"]
        final = step == spec.train.max_steps
        if val_src is not None and ((spec.eval_every and step % spec.eval_every == 0) or final):
            row.update(evaluate(step))
        if step % spec.log_every == 0 or final or "val_loss" in row:
            writer.log(row)
        last = row
        reported = {k: v for k, v in row.items() if v is not None}
        if writing and (ckpt.due(step) or "val_loss" in row):
            store.upload(spec.metrics_dir)  # before the report: stored metrics reach every stored checkpoint
        if ckpt.due(step):
            ckpt.save(model, opt, train_src, row, reported)
        elif "val_loss" in row:
            session.report(reported, None)
        for fn in callbacks:
            fn(step, StepContext(w, train_src, row))

    spec.objective.export(model, w)
    writer.close()
    if writing and last and spec.write_report:
        write_report(spec.metrics_dir, extra={**spec.extra_report, "world_size": w.world,
                                              "export_dir": spec.export_dir,
                                              "trainable_params": last["trainable_params"], **{k: v for k, v in last.items() if k.startswith("val_")}})
    if writing:
        store.upload()  # metrics, report, exports: everything rank 0 wrote (a URI run)
    dist.barrier()
    return {**last, "shard_sizes": shard_sizes, "full_params": full, "world_size": w.world,
            "resumed_from_step": resumed_from}
