"""Supervised fine-tuning (full or LoRA) with FSDP2 on Ray Train.

Runbook::

    llamaray sft --config configs/sft-tiny.yaml --set init=runs/pretrain-tiny/hf --set data.train=train.jsonl
    python -m jobs.sft --config sft-smollm2 --set data.train=runs/rs/round1/sft.jsonl      # LoRA on SmolLM2-135M
    python -m jobs.sft --config sft-tiny --set lora.enabled=true --set lora.rank=16

Data: JSONL/Parquet rows ``{prompt, response}`` or chat ``{messages: [...]}`` (jobs/sft_data.py states the drop
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
that vLLM loads), ``adapter/`` (``adapter.safetensors`` + ``adapter_config.json``, LoRA only).

Why a worker of its own (``finetune_worker``) rather than jobs/train_loop.run_worker: that loop builds the model from a
seed (no initial weights, no LoRA before sharding), its loss returns a bare scalar (no DPO statistics) and its
evaluation has no generation metric. The worker here reuses its pieces (lr schedule, data addressing, param groups,
sessions, DCP checkpointing, metrics writer) and adds those three hooks.
Leaves out: sequence packing (rows are right-padded per micro-batch), loading ``init`` straight into shards (each
worker reads the full HF weights, fine up to a few B parameters), multi-node storage for ``<run>/data``.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from jobs.config import job_arg_parser, load_config, to_dict
from jobs.pretrain import RunSettings, ScalingSettings, fit_on_ray
from jobs.train_loop import TrainConfig
from model.llama import ConfigError, ModelArgs
from model.lora import LoraConfig

# ------------------------------------------------------------------------------------------------ config


@dataclass
class LoraSettings:
    """Low-rank adapters (model/lora.py); off = full fine-tuning."""

    enabled: bool = False
    """Train LoRA adapters on a frozen base instead of every weight."""
    rank: int = 8
    """Rank r of each adapter."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input while training."""
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    """Linear layers of each block that get an adapter (wq wk wv wo w1 w2 w3)."""
    save_adapter: bool = True
    """Also write the adapter alone (<run>/adapter: adapter.safetensors + adapter_config.json)."""

    def __post_init__(self) -> None:
        try:
            self.config()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def config(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=tuple(self.targets))


@dataclass
class SftData:
    """Where the instruction rows are and how the held-out split is made."""

    train: str = ""
    """JSONL / JSON / Parquet file of {prompt, response} or {messages} rows."""
    val: str = ""
    """Held-out file of the same kind; empty = hold out ``val_fraction`` of ``train`` (seeded shuffle)."""
    val_fraction: float = 0.1
    """Share of ``train`` held out when ``val`` is empty."""
    max_len: int = 0
    """Longest rendered chat in tokens (longer rows are dropped and counted); 0 = the model's max_seq_len."""
    seed: int = 0
    """Seed of the train/val shuffle."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_len < 0:
            raise ConfigError(f"data.max_len must be >= 0, got {self.max_len}")


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


def _default_run() -> RunSettings:
    return RunSettings(name="sft-tiny", ckpt_every=0, eval_every=50)


@dataclass
class SftConfig:
    """A fine-tuning run: starting weights, data, LoRA, optimisation, evaluation, bookkeeping, scaling."""

    init: str = ""
    """Starting weights: HF Llama dir, .gguf file, or pretraining DCP checkpoint dir; empty = fresh ``model``."""
    tokenizer: str = ""
    """Tokenizer directory; empty = the one in ``init`` (required when ``init`` is empty)."""
    model: ModelArgs = field(default_factory=lambda: ModelArgs.from_name("tiny"))
    """Model shape, used only when ``init`` is empty (otherwise read from init's config.json)."""
    data: SftData = field(default_factory=SftData)
    """Instruction rows."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (off = full fine-tuning)."""
    eval: TaskEval = field(default_factory=TaskEval)
    """Task metric on held-out prompts."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    """Optimisation (jobs/train_loop.py TrainConfig)."""
    run: RunSettings = field(default_factory=_default_run)
    """Name, storage, checkpoints, evaluation cadence."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    """Workers and devices."""

    def __post_init__(self) -> None:
        if not self.data.train:
            raise ConfigError("data.train: no training file given (set data.train=FILE)")
        if not self.init and not self.tokenizer:
            raise ConfigError("tokenizer: with no init weights, name a tokenizer directory (tokenizer=DIR)")
        self.train.grad_accum(self.scaling.num_workers)


# ------------------------------------------------------------------------------------------------ worker


@dataclass
class FinetuneSpec:
    """Everything a fine-tuning worker needs; picklable."""

    model_args: ModelArgs
    train: TrainConfig
    objective: Literal["sft", "dpo"]
    train_path: str
    val_path: str | None
    pad_id: int
    init_dir: str | None = None
    """HF directory with the starting weights (None: fresh weights from train.seed)."""
    lora: LoraConfig | None = None
    beta: float = 0.1
    """DPO β."""
    task_prompts: list[list[int]] = field(default_factory=list)
    task_refs: list[str] = field(default_factory=list)
    task_metric: str = "none"
    max_new_tokens: int = 48
    stop_ids: list[int] = field(default_factory=list)
    tokenizer_dir: str | None = None
    metrics_dir: str | None = None
    ckpt_every: int = 0
    eval_every: int = 0
    export_dir: str | None = None
    adapter_dir: str | None = None
    adapter_meta: dict[str, Any] = field(default_factory=dict)
    fail_at_step: int = 0
    extra_report: dict[str, Any] = field(default_factory=dict)


def sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy over the assistant tokens of the micro-batch."""
    from model.losses import next_token_loss

    return next_token_loss(model(batch["tokens"]), batch["labels"]), {}


def dpo_batch_loss(model: nn.Module, batch: dict[str, Tensor], beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO on a batch of B chosen rows followed by B rejected rows with precomputed reference log-probs."""
    from model.losses import dpo_loss, sequence_logprobs

    logp = sequence_logprobs(model(batch["tokens"]), batch["labels"])  # (2B,)
    ref = batch["ref"]
    b = logp.shape[0] // 2
    s = dpo_loss(logp[:b], logp[b:], ref[:b], ref[b:], beta)
    pc, pr = logp[:b].detach(), logp[b:].detach()
    return s.loss, {"reward_margin": s.reward_margin, "reward_accuracy": s.accuracy,
                    "chosen_logp": pc.mean(), "rejected_logp": pr.mean(), "logp_margin": (pc - pr).mean()}


def _loss(spec: FinetuneSpec, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
    return sft_loss(model, batch) if spec.objective == "sft" else dpo_batch_loss(model, batch, spec.beta)


def _source(spec: FinetuneSpec, path: str):
    from jobs.sft_data import PairRows, SftRows

    return (SftRows if spec.objective == "sft" else PairRows)(path, spec.pad_id)


def build_start_model(spec: FinetuneSpec) -> nn.Module:
    """The starting weights (init dir or seeded fresh), plus LoRA adapters seeded identically on every rank."""
    from model.llama import build_model
    from model.lora import add_lora

    if spec.init_dir:
        from model.hf import load_hf

        model, _ = load_hf(spec.init_dir, dtype=torch.float32)
    else:
        model = build_model(spec.model_args, device="cpu", seed=spec.train.seed)
    if spec.lora is not None:
        torch.manual_seed(spec.train.seed)
        add_lora(model, spec.lora)
    model.train()
    return model


def full_plain_model(model: nn.Module, spec: FinetuneSpec, *, rank: int) -> tuple[nn.Module | None, dict | None]:
    """Collective: (merged plain Transformer, adapter tensors or None) on rank 0; (None, None) elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from model.llama import build_model
    from model.lora import add_lora, lora_state_dict, merge_lora

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None, None
    plain = build_model(spec.model_args, device="cpu", seed=None)
    adapter = None
    if spec.lora is not None:
        add_lora(plain, spec.lora)
    plain.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    if spec.lora is not None:
        adapter = lora_state_dict(plain)
        merge_lora(plain)
    plain.eval()
    return plain, adapter


def task_accuracy(plain: nn.Module, spec: FinetuneSpec, tok: Any) -> tuple[float, list[str]]:
    """Greedy answers to the held-out prompts, scored with the numeric verifier or exact match."""
    from actors.verifiers import MatchVerifier, NumericVerifier
    from model.sampler import SamplingParams, generate

    verifier = NumericVerifier() if spec.task_metric == "numeric" else MatchVerifier()
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=0.0, stop_token_ids=tuple(spec.stop_ids))
    with torch.no_grad():
        outs = generate(plain, spec.task_prompts, params, tokenizer=tok)
    texts = [o[0].text or "" for o in outs]
    correct = sum(verifier(t, r).passed for t, r in zip(texts, spec.task_refs))
    return correct / max(len(texts), 1), texts


def _evaluate(model: nn.Module, spec: FinetuneSpec, source: Any, device: torch.device, rank: int,
              world: int, tok: Any) -> dict[str, float]:
    import torch.distributed as dist

    from jobs.train_loop import micro_batch_indices

    micro = spec.train.micro_batch_size
    n = min(spec.train.eval_sequences or source.num_rows, source.num_rows)
    n_batches = max(1, math.ceil(n / (micro * world)))  # the same count on every rank (FSDP collectives)
    sums: dict[str, Tensor] = {}
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            loss, stats = _loss(spec, model, source.batch(micro_batch_indices(0, b, rank, world, micro), device))
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.double()
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys]) / n_batches
    dist.all_reduce(vec)
    out = {f"val_{k}": float(v) / world for k, v in zip(keys, vec)}
    if spec.task_prompts and spec.task_metric != "none":
        plain, _ = full_plain_model(model, spec, rank=rank)
        acc = torch.zeros(1, dtype=torch.float64)
        if rank == 0:
            acc[0] = task_accuracy(plain, spec, tok)[0]
        acc = acc.to(device)
        dist.broadcast(acc, 0)
        out["val_task_accuracy"] = float(acc[0])
    model.train()
    return out


def save_adapter(adapter: dict[str, Tensor], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """adapter.safetensors (our parameter names, e.g. ``layers.0.attention.wq.lora_a``) + adapter_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return out


def finetune_worker(spec: FinetuneSpec, session: Any) -> dict[str, Any]:
    """One worker's run: start weights → (LoRA) → FSDP2 → restore → loop with eval/checkpoints → export."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from jobs import checkpointing
    from jobs.metrics import MetricsWriter, write_report
    from jobs.parallel import apply_fsdp, init_process_group_if_needed
    from jobs.train_loop import lr_at, micro_batch_indices, param_groups
    from model.tokenizer import load_tokenizer

    device = session.device()
    init_process_group_if_needed(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = spec.train
    accum = cfg.grad_accum(world)
    tok = load_tokenizer(spec.tokenizer_dir) if spec.tokenizer_dir else None

    model = build_start_model(spec).to(device)
    apply_fsdp(model, device_type=device.type, mesh=init_device_mesh(device.type, (world,)), compile=cfg.compile,
               activation_checkpointing=cfg.activation_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")
    step, consumed, resumed_from = 0, 0, None
    with session.restore() as ckpt_dir:
        if ckpt_dir is not None:
            state = checkpointing.load(ckpt_dir, model, opt)
            step, consumed, resumed_from = int(state["step"]), int(state["consumed"]), int(state["step"])
    train_src = _source(spec, spec.train_path)
    val_src = _source(spec, spec.val_path) if spec.val_path else None
    enabled = rank == 0 and spec.metrics_dir is not None
    writer = MetricsWriter(spec.metrics_dir or ".", enabled=enabled, resume_step=step)
    eval_log = Path(spec.metrics_dir or ".", "eval.jsonl")

    def log_eval(row: dict[str, Any]) -> None:
        if enabled:
            with eval_log.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if enabled and step == 0:
        eval_log.unlink(missing_ok=True)
    if val_src is not None and step == 0:  # the "before" figure every fine-tuning report needs
        before = _evaluate(model, spec, val_src, device, rank, world, tok)
        log_eval({"step": 0, **before})
    last: dict[str, Any] = {}
    model.train()
    while step < cfg.max_steps:
        step += 1
        if spec.fail_at_step and step == spec.fail_at_step and rank == world - 1 and spec.metrics_dir:
            marker = Path(spec.metrics_dir, f"killed-at-{step}")
            if not marker.exists():
                marker.touch()
                session.settle()
                os.kill(os.getpid(), signal.SIGKILL)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        stat_sums: dict[str, Tensor] = {}
        tokens = torch.zeros((), device=device)
        for a in range(accum):
            batch = train_src.batch(micro_batch_indices(consumed, a, rank, world, cfg.micro_batch_size), device)
            tokens += batch["tokens"].numel()
            loss, stats = _loss(spec, model, batch)
            (loss / accum).backward()
            loss_sum += loss.detach() / accum
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, torch.zeros((), device=device)) + v / accum
        params = [p for p in model.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        opt.step()
        opt.zero_grad(set_to_none=True)
        consumed += cfg.batch_size
        keys = sorted(stat_sums)
        vec = torch.stack([loss_sum, tokens] + [stat_sums[k] for k in keys])
        dist.all_reduce(vec)
        dt = time.perf_counter() - t0
        row: dict[str, Any] = {"step": step, "loss": float(vec[0]) / world, "lr": lr, "grad_norm": float(gn),
                               "tokens_per_s": float(vec[1]) / dt, "consumed": consumed, "world_size": world,
                               "trainable_params": trainable,
                               **{k: float(v) / world for k, v in zip(keys, vec[2:])}}
        final = step == cfg.max_steps
        if val_src is not None and ((spec.eval_every and step % spec.eval_every == 0) or final):
            ev = _evaluate(model, spec, val_src, device, rank, world, tok)
            row.update(ev)
            log_eval({"step": step, **ev})
        writer.log(row)
        last = row
        if (spec.ckpt_every and step % spec.ckpt_every == 0) or final:
            state = {"step": step, "consumed": consumed, "world_size": world, "model": spec.model_args.to_dict(),
                     "objective": spec.objective}
            with tempfile.TemporaryDirectory(prefix="llamaray-ckpt-") as d:
                checkpointing.save(d, model, opt, state, rank=rank)
                session.report({k: v for k, v in row.items() if v is not None}, Path(d))
        elif "val_loss" in row:
            session.report({k: v for k, v in row.items() if v is not None}, None)

    if spec.export_dir or spec.adapter_dir:
        plain, adapter = full_plain_model(model, spec, rank=rank)
        if rank == 0:
            from model.hf import save_hf

            if spec.export_dir:
                save_hf(plain, tok, spec.export_dir)
            if spec.adapter_dir and adapter is not None:
                save_adapter(adapter, spec.adapter_dir, spec.adapter_meta)
    writer.close()
    if rank == 0 and spec.metrics_dir and last:
        write_report(spec.metrics_dir, extra={**spec.extra_report, "world_size": world, "export_dir": spec.export_dir,
                                              "trainable_params": trainable,
                                              **{k: v for k, v in last.items() if k.startswith("val_")}})
    dist.barrier()
    return {**last, "resumed_from_step": resumed_from}


def _train_fn(config: dict[str, Any]) -> None:
    from jobs.train_loop import RaySession

    finetune_worker(config["spec"], RaySession())


# ------------------------------------------------------------------------------------------------ driver


def run_dir(run: RunSettings) -> Path:
    return Path(run.storage).resolve() / run.name


def resolve_init(init: str, rd: Path, tokenizer: str = "") -> str | None:
    """``init`` as an HF directory: HF dirs as they are; a .gguf is imported and a DCP checkpoint converted into
    ``<run>/init`` (once; the tokenizer comes from ``tokenizer`` or the pretraining run's ``data/tokenizer``).
    A LoRA run's checkpoint holds adapter tensors and is not a valid init: start from its ``hf/`` export instead.
    Raises ConfigError for anything else."""
    if not init:
        return None
    p = Path(init)
    if not p.exists():
        raise ConfigError(f"init: {p} does not exist")
    out = rd / "init"
    if p.is_file():
        with p.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ConfigError(f"init: {p} is a file but not a GGUF model (give an HF directory, .gguf, or checkpoint)")
        if not (out / "config.json").is_file():
            from model.gguf import import_gguf

            import_gguf(p, out)
        return str(out)
    if (p / "config.json").is_file():
        return str(p)
    if (p / "train_state.json").is_file():
        if not (out / "config.json").is_file():
            from jobs.checkpointing import dcp_to_hf, read_train_state

            args = ModelArgs.from_dict(read_train_state(p)["model"], source=str(p / "train_state.json"))
            tok_dir = Path(tokenizer) if tokenizer else p.parent / "data" / "tokenizer"
            try:
                dcp_to_hf(p, args, tok_dir if tok_dir.exists() else None, out)
            except Exception as e:  # DCP raises several types for missing/mismatched tensors
                raise ConfigError(f"init: {p} cannot be read as a full-model training checkpoint: {e}") from e
        return str(out)
    raise ConfigError(f"init: {p} is neither an HF Llama directory (config.json) nor a training checkpoint "
                      "(train_state.json)")


def start_point(init: str, tokenizer: str, model: ModelArgs, rd: Path) -> tuple[str | None, ModelArgs, Any, str]:
    """(init HF dir, model args, tokenizer, tokenizer dir), checked against each other."""
    from model.hf import CONFIG_NAME, args_from_hf_config, check_tokenizer_fits
    from model.tokenizer import load_tokenizer

    init_dir = resolve_init(init, rd, tokenizer)
    if init_dir:
        cfg_path = Path(init_dir) / CONFIG_NAME
        model = args_from_hf_config(json.loads(cfg_path.read_text()), str(cfg_path))
    tok_dir = tokenizer or init_dir
    try:
        tok = load_tokenizer(tok_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: cannot load a tokenizer from {tok_dir}: {e}") from e
    try:
        check_tokenizer_fits(tok, model.vocab_size, f"tokenizer {tok_dir}")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return init_dir, model, tok, str(tok_dir)


def split_rows(train_file: str, val_file: str, fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    from jobs.sft_data import DataError, read_rows

    try:
        train = read_rows(train_file)
        if val_file:
            return train, read_rows(val_file)
    except DataError as e:
        raise ConfigError(str(e)) from e
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(train) * fraction))
    return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]


def check_cluster(run: RunSettings, scaling: ScalingSettings) -> None:
    from cluster.connect import check_resources, connect

    connect(run.address or None)
    check_resources(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, cpus_per_worker=scaling.cpus_per_worker)


def launch(spec: FinetuneSpec, run: RunSettings, scaling: ScalingSettings) -> Any:
    """Run ``finetune_worker`` on Ray Train exactly as pretraining runs its workers; returns the Result."""
    return fit_on_ray(_train_fn, spec, run, scaling, spec.train.max_steps)


def task_prompts(rows: list[Any], tok: Any, n: int, max_len: int, max_new: int) -> tuple[list[list[int]], list[str]]:
    """The first ``n`` usable held-out rows as (prompt ids with the generation prompt, reference answer)."""
    from jobs.sft_data import BadRow, prompt_messages, reference_answer

    prompts, refs = [], []
    for row in rows:
        if len(prompts) >= n:
            break
        try:
            ref = reference_answer(row)
            ids = tok.render_chat(prompt_messages(row), add_generation_prompt=True)[0]
        except (BadRow, ValueError):
            continue
        if ref is None or not ref.strip() or len(ids) + max_new > max_len:
            continue
        prompts.append(ids)
        refs.append(ref)
    return prompts, refs


@dataclass
class Start:
    """What SFT and DPO share before their data differ: weights, tokenizer, rendered splits."""

    rd: Path
    init_dir: str | None
    args: ModelArgs
    tok: Any
    tok_dir: str
    val_rows: list[Any]
    train: Any
    val: Any


def render_start(init: str, tokenizer: str, model: ModelArgs, data: SftData, run: RunSettings,
                 scaling: ScalingSettings, render: Callable, what: str) -> Start:
    """Resolve the starting weights and tokenizer, split and render the rows (``render`` per row), refuse a file with
    no usable ``what``, and check the cluster — everything before any worker starts."""
    from jobs.sft_data import render_all

    rd = run_dir(run)
    init_dir, args, tok, tok_dir = start_point(init, tokenizer, model, rd)
    max_len = data.max_len or args.max_seq_len
    if max_len > args.max_seq_len:
        raise ConfigError(f"data.max_len={max_len} is above the model's context (max_seq_len={args.max_seq_len})")
    train_rows, val_rows = split_rows(data.train, data.val, data.val_fraction, data.seed)
    tr = render_all(train_rows, render, tok, max_len)
    va = render_all(val_rows, render, tok, max_len)
    if not tr.rows:
        raise ConfigError(f"data.train: {data.train} has no usable {what} (dropped: {dict(tr.dropped)})")
    check_cluster(run, scaling)
    return Start(rd, init_dir, args, tok, tok_dir, val_rows, tr, va)


def sft(cfg: SftConfig) -> dict[str, Any]:
    """Run (or resume) an SFT job; returns final metrics and where the outputs are."""
    from jobs.sft_data import render_sft_row, save_rendered

    st = render_start(cfg.init, cfg.tokenizer, cfg.model, cfg.data, cfg.run, cfg.scaling, render_sft_row, "row")
    rd, init_dir, args, tok, tok_dir, val_rows, tr, va = (st.rd, st.init_dir, st.args, st.tok, st.tok_dir,
                                                           st.val_rows, st.train, st.val)
    data_dir = rd / "data"
    save_rendered(tr, data_dir / "train.parquet", ("inputs", "labels"))
    if va.rows:
        save_rendered(va, data_dir / "val.parquet", ("inputs", "labels"))
    stats = {**tr.drop_metrics("train"), **va.drop_metrics("val")}
    (data_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    (rd / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    prompts, refs = ([], []) if cfg.eval.metric == "none" else task_prompts(
        [val_rows[i] for i in va.kept_index], tok, cfg.eval.prompts, args.max_seq_len, cfg.eval.max_new_tokens)
    lora = cfg.lora.config() if cfg.lora.enabled else None
    spec = FinetuneSpec(
        model_args=args, train=cfg.train, objective="sft", train_path=str(data_dir / "train.parquet"),
        val_path=str(data_dir / "val.parquet") if va.rows else None, pad_id=tok.pad_id or 0, init_dir=init_dir,
        lora=lora, task_prompts=prompts, task_refs=refs, task_metric=cfg.eval.metric,
        max_new_tokens=cfg.eval.max_new_tokens, stop_ids=list(getattr(tok, "stop_ids", [tok.eos_id])),
        tokenizer_dir=tok_dir, metrics_dir=str(rd / "metrics"), ckpt_every=cfg.run.ckpt_every,
        eval_every=cfg.run.eval_every, export_dir=str(rd / "hf") if cfg.run.export else None,
        adapter_dir=str(rd / "adapter") if lora and cfg.lora.save_adapter else None,
        adapter_meta=adapter_meta(lora, init_dir), fail_at_step=cfg.run.fail_at_step, extra_report=stats)
    result = launch(spec, cfg.run, cfg.scaling)
    return {"run_dir": str(rd), "metrics": result.metrics, "data": stats,
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "export": spec.export_dir, "adapter": spec.adapter_dir, "report": str(rd / "metrics" / "report.md")}


def adapter_meta(lora: LoraConfig | None, init_dir: str | None) -> dict[str, Any]:
    if lora is None:
        return {}
    return {"format": "llamaray-lora", "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
            "targets": list(lora.targets), "base_model": init_dir,
            "note": "tensors named <block path>.<target>.lora_a (r, in) / .lora_b (out, r); W' = W + alpha/r·B·A"}


def run_job(prog: str, doc: str | None, argv: list[str] | None, cls: type, fn: Callable[[Any], dict]) -> int:
    ap = job_arg_parser(prog, doc)
    a = ap.parse_args(argv)
    try:
        cfg = load_config(cls, a.config, a.overrides)
        out = fn(cfg)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("llamaray sft", __doc__, argv, SftConfig, sft)


if __name__ == "__main__":
    sys.exit(main())
