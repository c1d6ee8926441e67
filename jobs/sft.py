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
that vLLM loads), ``adapter/`` (``adapter.safetensors`` + ``adapter_config.json``, LoRA only). ``run.storage`` may be
an object-store URI as for pretraining (``s3://bucket/runs``: everything above, ``data/`` and ``init/`` included,
lands there and a rerun anywhere resumes from it); ``init``, ``tokenizer`` and the data files are read as local files
(paths every node sees), so a URI there is refused with what to do.

Training runs jobs/train_loop.run_worker, the loop pretraining uses, with ``FinetuneObjective`` (SFT and DPO): it
starts from ``init`` and adds LoRA before sharding, returns DPO statistics with the loss, adds the task metric to
validation and exports merged weights plus the adapter.
Leaves out: sequence packing (rows are right-padded per micro-batch), loading ``init`` straight into shards (each
worker reads the full HF weights, fine up to a few B parameters), ``init``/data straight from a bucket.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.storage import RunStore, require_path
from core.config import ConfigError, job_arg_parser, load_config, to_dict
from jobs.pretrain import RunSettings, ScalingSettings, check_cluster, checkpoint_location, fit_on_ray, run_store
from jobs.train_loop import LoopSpec, TrainConfig, Worker
from model.llama import ModelArgs
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
        require_local_inputs(self, "sft")
        self.train.grad_accum(self.scaling.num_workers)


# ------------------------------------------------------------------------------------------------ objective


def answer_token_logprobs(model: nn.Module, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(log p(label) at each labelled position (N,), the (B, T) mask of those positions).

    The output head runs on the labelled (assistant) positions only: prompt and padding positions never get logits
    (with a 128k vocabulary the head is most of an SFT or DPO step, and full (B, T, V) float32 logits are gigabytes).
    Like ``fused_lm_loss`` it relies on the FSDP root staying unsharded after ``hidden_states`` (jobs/parallel.py)."""
    from model.losses import IGNORE

    keep = labels != IGNORE
    h = model.hidden_states(tokens)[keep]  # (N, dim), N = labelled tokens in the micro-batch
    return -F.cross_entropy(model.output(h).float(), labels[keep], reduction="none"), keep


def answer_logprobs(model: nn.Module, tokens: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(label) over each row's labelled positions → (B,); equal to
    ``sequence_logprobs(model(tokens), labels)`` without the full logits."""
    token_logp, keep = answer_token_logprobs(model, tokens, labels)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(len(labels), dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)


def sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy over the assistant tokens of the micro-batch; equal to
    ``next_token_loss(model(tokens), labels)`` without the full logits."""
    token_logp, _ = answer_token_logprobs(model, batch["tokens"], batch["labels"])
    return -token_logp.mean(), {}


def dpo_batch_loss(model: nn.Module, batch: dict[str, Tensor], beta: float,
                   nll_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO on a batch of B chosen rows followed by B rejected rows with precomputed reference log-probs,
    plus ``nll_weight`` × the chosen answers' mean per-token negative log-likelihood (Llama 3's DPO: 0.2)."""
    from model.losses import IGNORE, dpo_loss

    labels = batch["labels"]
    logp = answer_logprobs(model, batch["tokens"], labels)  # (2B,)
    ref = batch["ref"]
    b = logp.shape[0] // 2
    s = dpo_loss(logp[:b], logp[b:], ref[:b], ref[b:], beta)
    chosen_nll = -logp[:b].sum() / (labels[:b] != IGNORE).sum().clamp_min(1)
    loss = s.loss + nll_weight * chosen_nll if nll_weight else s.loss
    pc, pr = logp[:b].detach(), logp[b:].detach()
    return loss, {"dpo_loss": s.loss.detach(), "chosen_nll": chosen_nll.detach(), "reward_margin": s.reward_margin,
                  "reward_accuracy": s.accuracy, "chosen_logp": pc.mean(), "rejected_logp": pr.mean(),
                  "logp_margin": (pc - pr).mean()}


@dataclass
class FinetuneObjective:
    """SFT or DPO as a jobs/train_loop.Objective: starting weights (+ LoRA adapters) instead of a fresh model, DPO
    statistics next to the loss, the task metric in validation, merged HF weights + the adapter alone as export."""

    name: Literal["sft", "dpo"]
    """sft: cross-entropy on assistant tokens; dpo: sigmoid DPO against precomputed reference log-probs."""
    init_dir: str | None = None
    """HF directory with the starting weights (None: fresh weights from train.seed)."""
    lora: LoraConfig | None = None
    """Adapters on a frozen base (None: full fine-tuning)."""
    beta: float = 0.1
    """DPO β."""
    nll_weight: float = 0.0
    """DPO: weight of the chosen answers' per-token NLL added to the loss."""
    task_prompts: list[list[int]] = field(default_factory=list)
    """Held-out prompt ids (with the generation prompt) for the task metric."""
    task_refs: list[str] = field(default_factory=list)
    """Reference answer of each task prompt."""
    task_metric: str = "none"
    """numeric, exact or none (TaskEval.metric)."""
    max_new_tokens: int = 48
    """Generation budget per task prompt."""
    adapter_dir: str | None = None
    """Also write the adapter alone here (LoRA only; None: don't)."""
    adapter_meta: dict[str, Any] = field(default_factory=dict)
    """Contents of the adapter's adapter_config.json."""

    def build_model(self, args: ModelArgs, train: TrainConfig) -> nn.Module:
        from model.llama import build_model
        from model.lora import add_lora

        if self.init_dir:
            from model.hf import load_hf

            model, _ = load_hf(self.init_dir, dtype=torch.float32)
        else:
            model = build_model(args, device="cpu", seed=train.seed)
        if self.lora is not None:
            torch.manual_seed(train.seed)  # the same adapters on every rank
            add_lora(model, self.lora)
        return model

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.name == "sft":
            return sft_loss(model, batch)
        return dpo_batch_loss(model, batch, self.beta, self.nll_weight)

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return batch["tokens"].numel()

    def seq_len(self, batch: dict[str, Tensor]) -> int:
        return batch["tokens"].shape[1]  # the micro-batch's padded length, not data.max_len

    def eval_extras(self, model: nn.Module, val: dict[str, float], w: Worker) -> dict[str, float]:
        """val_task_accuracy: rank 0 generates with the merged weights, every rank gets the figure."""
        import torch.distributed as dist

        if not self.task_prompts or self.task_metric == "none":
            return {}
        plain, _ = self.plain_model(model, w)
        acc = torch.zeros(1, dtype=torch.float64)
        if w.rank == 0:
            acc[0] = self.task_accuracy(plain, w.tok)[0]
        acc = acc.to(w.device)
        dist.broadcast(acc, 0)
        return {"val_task_accuracy": float(acc[0])}

    def export(self, model: nn.Module, w: Worker) -> None:
        if not (w.spec.export_dir or self.adapter_dir):
            return
        plain, adapter = self.plain_model(model, w)
        if w.rank == 0:
            from model.hf import save_hf

            if w.spec.export_dir:
                save_hf(plain, w.tok, w.spec.export_dir)
            if self.adapter_dir and adapter is not None:
                save_adapter(adapter, self.adapter_dir, self.adapter_meta)

    def plain_model(self, model: nn.Module, w: Worker) -> tuple[nn.Module | None, dict | None]:
        """Collective: (merged plain Transformer, adapter tensors or None) on rank 0; (None, None) elsewhere."""
        from jobs.checkpointing import gather_full_model
        from model.lora import lora_state_dict, merge_lora

        plain = gather_full_model(model, w.spec.model_args, rank=w.rank, lora=self.lora)
        if plain is None:
            return None, None
        adapter = None
        if self.lora is not None:
            adapter = lora_state_dict(plain)
            merge_lora(plain)
        return plain.eval(), adapter

    def task_accuracy(self, plain: nn.Module, tok: Any) -> tuple[float, list[str]]:
        """Greedy answers to the held-out prompts, scored with the numeric verifier or exact match."""
        from actors.verifiers import MatchVerifier, NumericVerifier
        from model.sampler import SamplingParams, generate

        verifier = NumericVerifier() if self.task_metric == "numeric" else MatchVerifier()
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0,
                                stop_token_ids=tuple(getattr(tok, "stop_ids", [tok.eos_id])))
        with torch.no_grad():
            outs = generate(plain, self.task_prompts, params, tokenizer=tok)
        texts = [o[0].text or "" for o in outs]
        correct = sum(verifier(t, r).passed for t, r in zip(texts, self.task_refs))
        return correct / max(len(texts), 1), texts


def save_adapter(adapter: dict[str, Tensor], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """adapter.safetensors (our parameter names, e.g. ``layers.0.attention.wq.lora_a``) + adapter_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return out


# ------------------------------------------------------------------------------------------------ driver


def run_dir(run: RunSettings) -> Path:
    """The run directory as this process writes it (a URI run: its staging copy)."""
    return run_store(run).local


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
    """The run directory as the driver writes it (``store.local``)."""
    init_dir: str | None
    args: ModelArgs
    tok: Any
    tok_dir: str
    val_rows: list[Any]
    train: Any
    val: Any
    store: RunStore
    """The run directory (a path, or a URI with ``rd`` as its staging copy)."""


def render_start(init: str, tokenizer: str, model: ModelArgs, data: SftData, run: RunSettings,
                 scaling: ScalingSettings, render: Callable, what: str) -> Start:
    """Resolve the starting weights and tokenizer, split and render the rows (``render`` per row), refuse a file with
    no usable ``what``, and check the cluster — everything before any worker starts."""
    from jobs.sft_data import render_all

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
    check_cluster(run, scaling)
    return Start(rd, init_dir, args, tok, tok_dir, val_rows, tr, va, store)


def sft(cfg: SftConfig) -> dict[str, Any]:
    """Run (or resume) an SFT job; returns final metrics and where the outputs are."""
    from jobs.sft_data import render_sft_row, save_rendered

    st = render_start(cfg.init, cfg.tokenizer, cfg.model, cfg.data, cfg.run, cfg.scaling, render_sft_row, "row")
    for name, r in (("train", st.train), ("val", st.val)):
        if r.rows:
            save_rendered(r, st.rd / "data" / f"{name}.parquet", ("inputs", "labels"))
    prompts, refs = ([], []) if cfg.eval.metric == "none" else task_prompts(
        [st.val_rows[i] for i in st.val.kept_index], st.tok, cfg.eval.prompts, st.args.max_seq_len,
        cfg.eval.max_new_tokens)
    return train_finetune("sft", cfg, st, task_prompts=prompts, task_refs=refs, task_metric=cfg.eval.metric,
                          max_new_tokens=cfg.eval.max_new_tokens)


def train_finetune(name: Literal["sft", "dpo"], cfg: Any, st: Start, **objective: Any) -> dict[str, Any]:
    """Record data stats and config, then train ``FinetuneObjective(name, **objective)`` on the rendered
    ``<run>/data/{train,val}.parquet`` with jobs/train_loop.run_worker on Ray Train (``cfg``: an SftConfig or a
    DpoConfig); returns final metrics and where the outputs are."""
    from jobs.sft_data import PairRows, SftRows

    data = st.rd / "data"
    stats = {**st.train.drop_metrics("train"), **st.val.drop_metrics("val")}
    (data / "stats.json").write_text(json.dumps(stats, indent=2))
    (st.rd / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    st.store.upload("data", "init", "config.json")  # a URI run: before any worker starts, which reads them from there
    lora = cfg.lora.config() if cfg.lora.enabled else None
    obj = FinetuneObjective(name, st.init_dir, lora, adapter_meta=adapter_meta(lora, st.init_dir),
                            adapter_dir=str(st.rd / "adapter") if lora and cfg.lora.save_adapter else None, **objective)
    rows, pad = SftRows if name == "sft" else PairRows, st.tok.pad_id or 0
    dpo_settings = {"beta": obj.beta, "nll_weight": obj.nll_weight} if name == "dpo" else {}
    spec = LoopSpec(
        model_args=st.args, train=cfg.train, objective=obj, make_train_source=partial(rows, data / "train.parquet", pad),
        make_val_source=partial(rows, data / "val.parquet", pad) if st.val.rows else None,
        metrics_dir=str(st.rd / "metrics"),
        ckpt_every=cfg.run.ckpt_every, eval_every=cfg.run.eval_every, tokenizer_dir=st.tok_dir,
        export_dir=str(st.rd / "hf") if cfg.run.export else None, fail_at_step=cfg.run.fail_at_step,
        extra_report={**stats, **dpo_settings}, store=st.store, inputs=(st.init_dir, st.tok_dir, str(data)))
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
