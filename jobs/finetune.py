"""What the SFT and DPO commands share on the driver: the fine-tuning config base (``FinetuneConfig``, with
``LoraSettings`` and ``SftData``), the starting point (``init`` as an HF directory, the tokenizer), the rendered
splits (``render_start``) and the run itself (``train_finetune``: an objective of training/objectives on Ray Train
through jobs/trainer.py). jobs/sft.py and jobs/dpo.py stay short commands on top of it; neither imports the other.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar

from cluster.storage import RunStore, require_path
from core.config import ConfigError, to_dict
from jobs.trainer import RunSettings, ScalingSettings, check_cluster, checkpoint_location, fit_on_ray, run_store
from model.llama import ModelArgs
from model.lora import LoraConfig
from training.loop import LoopSpec, TrainConfig
from training.objectives.finetune import FinetuneObjective


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
    """Longest rendered chat in tokens (longer rows are dropped and counted); 0 = the model's max_seq_len. With
    ``pack`` also the length of a packed row."""
    pack: bool = False
    """Pack several conversations (DPO: pairs) into each row of up to ``max_len`` tokens instead of one per
    right-padded row (training/sft_data.pack_groups: first-fit, in data order). Each conversation attends only to
    itself, with positions from 0, so losses and log-probs are those of the unpacked rows; far less padding.
    ``train.batch_size``, ``micro_batch_size`` and ``eval_sequences`` then count packed rows (DPO: packed row pairs);
    a resumed run must keep ``pack`` and ``max_len`` (its data position counts those rows)."""
    seed: int = 0
    """Seed of the train/val shuffle."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_len < 0:
            raise ConfigError(f"data.max_len must be >= 0, got {self.max_len}")


@dataclass
class FinetuneConfig:
    """What an SFT and a DPO run share: starting weights, data, LoRA, optimisation, bookkeeping, scaling. SftConfig
    (jobs/sft.py) and DpoConfig (jobs/dpo.py) extend it with their own fields and defaults."""

    job: ClassVar[str] = "finetune"
    """The command's name, in error messages."""
    rows_what: ClassVar[str] = "training"
    """What data.train holds, in the missing-file error."""

    init: str = ""
    """Starting weights: HF Llama dir, .gguf file, or pretraining DCP checkpoint dir; empty = fresh ``model``."""
    tokenizer: str = ""
    """Tokenizer directory; empty = the one in ``init`` (required when ``init`` is empty)."""
    model: ModelArgs = field(default_factory=lambda: ModelArgs.from_name("tiny"))
    """Model shape, used only when ``init`` is empty (otherwise read from init's config.json)."""
    data: SftData = field(default_factory=SftData)
    """The rows (instructions for SFT, preference pairs for DPO)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (off = full fine-tuning)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation (training/loop.py TrainConfig)."""
    run: RunSettings = field(default_factory=RunSettings)
    """Name, storage, checkpoints, evaluation cadence."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    """Workers and devices."""

    def __post_init__(self) -> None:
        if not self.data.train:
            raise ConfigError(f"data.train: no {self.rows_what} file given (set data.train=FILE)")
        if not self.init and not self.tokenizer:
            raise ConfigError("tokenizer: with no init weights, name a tokenizer directory (tokenizer=DIR)")
        require_local_inputs(self, self.job)
        self.train.grad_accum(self.scaling.num_workers)


def require_local_inputs(cfg: Any, job: str) -> None:
    """ConfigError for an object-store URI where a fine-tuning job reads local files (init, tokenizer, data)."""
    for what, value in (("init", cfg.init), ("tokenizer", cfg.tokenizer), ("data.train", cfg.data.train),
                        ("data.val", cfg.data.val)):
        require_path(value, what, job)


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
            from training.checkpointing import dcp_to_hf, read_train_state

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
    from training.sft_data import DataError, read_rows

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


def task_prompts(rows: list[Any], tok: Any, n: int, max_len: int, max_new: int) -> tuple[list[list[dict]], list[str]]:
    """The first ``n`` usable held-out rows as (chat prompt without the answer, reference answer); rows whose prompt
    plus ``max_new`` tokens would not fit ``max_len`` are skipped."""
    from training.sft_data import BadRow, prompt_messages, reference_answer

    prompts, refs = [], []
    for row in rows:
        if len(prompts) >= n:
            break
        try:
            ref = reference_answer(row)
            messages = prompt_messages(row)
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), bos=True)
        except (BadRow, ValueError):
            continue
        if ref is None or not ref.strip() or len(ids) + max_new > max_len:
            continue
        prompts.append(messages)
        refs.append(ref)
    return prompts, refs


@dataclass
class Start:
    """What SFT and DPO share before their data differ: weights, tokenizer, rendered splits."""

    rd: Path
    """The run directory as the driver writes it (``store.local``)."""
    init_dir: str | None
    """The starting weights as an HF directory (None: fresh weights)."""
    args: ModelArgs
    """The model's shape (init's config.json, or the config's ``model``)."""
    tok: Any
    """The tokenizer."""
    tok_dir: str
    """Its directory."""
    val_rows: list[Any]
    """The held-out rows as read (before rendering)."""
    train: Any
    """The rendered training rows (training/sft_data.Rendered)."""
    val: Any
    """The rendered held-out rows."""
    max_len: int
    """data.max_len resolved (0 → the model's max_seq_len): the longest rendered row, and a packed row's length."""
    store: RunStore
    """The run directory (a path, or a URI with ``rd`` as its staging copy)."""


def render_start(cfg: FinetuneConfig, render: Callable, what: str) -> Start:
    """Resolve the starting weights and tokenizer, split and render the rows (``render`` per row), refuse a file with
    no usable ``what``, and check the cluster — everything before any worker starts."""
    from training.sft_data import render_all

    init, tokenizer, model, data, run = cfg.init, cfg.tokenizer, cfg.model, cfg.data, cfg.run
    store = run_store(run)
    rd = store.local
    store.download("data", "init")  # a URI run resumed on a fresh disk: DPO keeps its reference figures, init stays
    init_dir, args, tok, tok_dir = start_point(init, tokenizer, model, rd)
    max_len = data.max_len or args.max_seq_len
    if max_len > args.max_seq_len:
        raise ConfigError(f"data.max_len={max_len} is above the model's context (max_seq_len={args.max_seq_len})")
    train_rows, val_rows = split_rows(data.train, data.val, data.val_fraction, data.seed)
    tr = render_all(train_rows, render, tok, max_len)
    va = render_all(val_rows, render, tok, max_len)
    if not tr.rows:
        raise ConfigError(f"data.train: {data.train} has no usable {what} (dropped: {dict(tr.dropped)})")
    check_cluster(run, cfg.scaling)
    return Start(rd, init_dir, args, tok, tok_dir, val_rows, tr, va, max_len, store)


def train_finetune(cfg: FinetuneConfig, st: Start, make: type[FinetuneObjective], **objective: Any) -> dict[str, Any]:
    """Record data stats and config, then train ``make(...)`` (training/objectives: SftObjective, DpoObjective) on the
    rendered ``<run>/data/{train,val}.parquet`` (its ``rows`` type) on Ray Train; returns final metrics and where the
    outputs are. ``objective``: the objective's own fields (task metric, β, …)."""
    data = st.rd / "data"
    stats = {**st.train.drop_metrics("train"), **st.val.drop_metrics("val")}
    (data / "stats.json").write_text(json.dumps(stats, indent=2))
    (st.rd / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    st.store.upload("data", "init", "config.json")  # a URI run: before any worker starts, which reads them from there
    lora = cfg.lora.config() if cfg.lora.enabled else None
    obj = make(st.init_dir, lora, adapter_meta=adapter_meta(lora, st.init_dir),
               adapter_dir=str(st.rd / "adapter") if lora and cfg.lora.save_adapter else None, **objective)
    pad, pack_len = st.tok.pad_id or 0, st.max_len if cfg.data.pack else 0
    spec = LoopSpec(
        model_args=st.args, train=cfg.train, objective=obj,
        make_train_source=partial(make.rows, data / "train.parquet", pad, pack_len),
        make_val_source=partial(make.rows, data / "val.parquet", pad, pack_len) if st.val.rows else None,
        metrics_dir=str(st.rd / "metrics"),
        ckpt_every=cfg.run.ckpt_every, eval_every=cfg.run.eval_every, tokenizer_dir=st.tok_dir,
        export_dir=str(st.rd / "hf") if cfg.run.export else None,
        extra_report={**stats, **obj.report_settings()}, store=st.store, inputs=(st.init_dir, st.tok_dir, str(data)))
    result = fit_on_ray(spec, cfg.run, cfg.scaling)
    where = st.store.location_of
    return {"run_dir": st.store.location(), "metrics": result.metrics, "data": stats,
            "checkpoint": checkpoint_location(result, st.store),
            "export": spec.export_dir and where(spec.export_dir), "adapter": obj.adapter_dir and where(obj.adapter_dir),
            "report": st.store.location("metrics/report.md")}


def adapter_meta(lora: LoraConfig | None, init_dir: str | None) -> dict[str, Any]:
    if lora is None:
        return {}
    return {"format": "llamaray-lora", "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
            "targets": list(lora.targets), "base_model": init_dir,
            "note": "tensors named <block path>.<target>.lora_a (r, in) / .lora_b (out, r); W' = W + alpha/r·B·A"}
