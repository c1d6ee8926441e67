"""What SFT and DPO share: log-probs of the answer tokens only (the output head on labelled positions), and
``FinetuneObjective`` — starting weights + LoRA, the task metric, the merged export and the adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.llama import ModelArgs
from model.lora import LoraConfig
from training.loop import TrainConfig, Worker


def document_mask(doc: Tensor) -> Tensor:
    """Causal attention restricted to each token's own segment: ``doc`` (B, T) segment ids → (B, 1, T, T) bool,
    True where query t may attend to key s (s ≤ t and doc[t] == doc[s]); the block-diagonal mask of packed rows."""
    t = torch.arange(doc.shape[1], device=doc.device)
    causal = t[:, None] >= t[None, :]  # (T, T)
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


def answer_token_logprobs(model: nn.Module, tokens: Tensor, labels: Tensor, doc: Tensor | None = None,
                          positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(log p(label) at each labelled position (N,), the (B, T) mask of those positions).

    Packed rows (training/sft_data.collate) pass ``doc`` and ``positions``: each segment then attends only to itself
    (``document_mask``) with positions restarting at 0, as if it were alone in its row. Without ``positions``
    attention is plain causal.
    The output head runs on the labelled (assistant) positions only: prompt and padding positions never get logits
    (with a 128k vocabulary the head is most of an SFT or DPO step, and full (B, T, V) float32 logits are gigabytes).
    Like ``fused_lm_loss`` it relies on the FSDP root staying unsharded after ``hidden_states`` (training/parallel.py)."""
    logits, keep = answer_logits(model, tokens, labels, doc, positions)
    return -F.cross_entropy(logits, labels[keep], reduction="none"), keep


def answer_logits(model: nn.Module, tokens: Tensor, labels: Tensor, doc: Tensor | None = None,
                  positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(float32 logits at the labelled positions (N, V), the (B, T) mask of those positions): the output head on the
    labelled positions only (see ``answer_token_logprobs``)."""
    from model.losses import IGNORE

    keep = labels != IGNORE
    mask = None if positions is None else document_mask(doc)
    h = model.hidden_states(tokens, positions, mask=mask)[keep]  # (N, dim), N = labelled tokens in the micro-batch
    return model.output(h).float(), keep


def answer_logprobs(model: nn.Module, tokens: Tensor, labels: Tensor, doc: Tensor | None = None,
                    positions: Tensor | None = None) -> Tensor:
    """Sum of log p(label) over each segment's labelled positions → (S,) for segments 0 … S-1 of ``doc`` (without
    ``doc``: one segment per row, (B,)); equal to ``sequence_logprobs(model(tokens), labels)`` row by row without
    the full logits."""
    token_logp, keep = answer_token_logprobs(model, tokens, labels, doc, positions)
    seg = keep.nonzero()[:, 0] if doc is None else doc[keep]  # the segment of each labelled token
    n = len(labels) if doc is None else int(doc.max()) + 1
    return torch.zeros(n, dtype=token_logp.dtype, device=token_logp.device).index_add(0, seg, token_logp)


@dataclass
class FinetuneObjective:
    """What SFT and DPO share as a training/loop.Objective: starting weights (+ LoRA adapters) instead of a fresh
    model, the task metric in validation, merged HF weights + the adapter alone as export. A subclass sets ``name``
    and ``rows`` and defines ``loss`` (training/objectives/sft.py, dpo.py)."""

    init_dir: str | None = None
    """HF directory with the starting weights (None: fresh weights from train.seed)."""
    lora: LoraConfig | None = None
    """Adapters on a frozen base (None: full fine-tuning)."""
    task_prompts: list[list[dict[str, str]]] = field(default_factory=list)
    """Held-out chat prompts (without the answer) for the task metric."""
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

    def report_settings(self) -> dict[str, Any]:
        """The objective's own settings, for report.json / report.md (none by default)."""
        return {}

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return batch["tokens"].numel()

    def real_tokens(self, batch: dict[str, Tensor]) -> int:
        return int((batch["doc"] >= 0).sum())  # every position but the padding

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
        from training.checkpointing import gather_full_model
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
        """Greedy answers to the held-out prompts, scored with the task metric's verifier (tasks/evaluation.py)."""
        from tasks.evaluation import HeldOut, greedy_accuracy, sampler_answerer

        score = greedy_accuracy(sampler_answerer(plain, tok, self.max_new_tokens),
                                HeldOut(self.task_prompts, self.task_refs), self.task_metric)
        return score.accuracy, score.answers


def save_adapter(adapter: dict[str, Tensor], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """adapter.safetensors (our parameter names, e.g. ``layers.0.attention.wq.lora_a``) + adapter_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return out
