"""Instruction (SFT) and preference (DPO) rows: reading, validating, rendering with the chat template, batching.

Lives in training/ (not model/) because it reads JSONL/Parquet files with pyarrow and its row sources implement
training/data_stream.py's ``RowSource`` protocol (``num_rows``, ``batch(indices, device)``); the rendering itself only
uses the tokenizer's ``render_chat`` (model/tokenizer.py), which owns the exact assistant masks.

Accepted rows (JSONL, one object a line, or Parquet):
  SFT  ``{"prompt": str, "response": str}`` or ``{"messages": [{"role": system|user|assistant, "content": str}, …]}``
  DPO  ``{"prompt": str, "chosen": str, "rejected": str}``; ``messages`` (the chat before the answer) may replace
       ``prompt``.

Rules for bad rows (each dropped row is counted by reason, and the counts land in the run's metrics/report; a run never
crashes on a row): ``bad_schema`` (missing/mistyped fields), ``no_assistant`` (an SFT chat with no assistant turn, or
whose last message is not the assistant's), ``empty_response`` (an assistant turn / chosen / rejected that is empty or
only whitespace), ``too_long`` (the rendered chat is longer than ``max_len`` tokens: DROPPED, not truncated, since
cutting a chat would cut the very answer that is trained on), ``identical_pair`` (chosen == rejected). A file with no
usable row at all is a configuration error raised before any worker starts.

Labels: ``labels[t] = ids[t + 1]`` where token t + 1 belongs to an assistant turn (its content and the template's
end-of-turn marker), else -100; the model reads ``ids[:-1]``. For DPO only the final answer is labelled.

Batches (``collate``): one rendered chat (DPO: one chosen and one rejected sequence) per right-padded row, or with
packing (``pack_groups``; the config's ``data.pack``) several per row, told apart by per-token segment ids ``doc``
and positions restarting at 0; the rendered files are the same either way.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from model.losses import IGNORE

DROP_REASONS = ("bad_schema", "no_assistant", "empty_response", "too_long", "identical_pair")


class DataError(ValueError):
    """A data file that cannot be used at all (missing, unreadable, no usable row); names the file."""


class BadRow(ValueError):
    """One row that is dropped; ``reason`` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ reading


def read_rows(path: str | Path) -> list[Any]:
    """All rows of a ``.jsonl`` / ``.json`` (a list) / ``.parquet`` file. A line that is not JSON is kept as ``None``
    (dropped later as bad_schema) so one broken line does not sink the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{p}: not a readable Parquet file: {e}") from e
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON: {e}") from e
        if not isinstance(rows, list):
            raise DataError(f"{p}: a .json data file must hold a list of rows, got {type(rows).__name__}")
        return rows
    rows: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(None)
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def _messages(row: Any, *, answer_keys: tuple[str, ...]) -> list[dict[str, str]]:
    from model.tokenizer import validate_messages

    if not isinstance(row, dict):
        raise BadRow("bad_schema", f"a row must be an object, got {type(row).__name__}")
    if "messages" in row and row["messages"] is not None:
        try:
            return validate_messages(row["messages"])
        except ValueError as e:
            raise BadRow("bad_schema", str(e)) from e
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        keys = "'messages' or 'prompt'" + "".join(f" + {k!r}" for k in answer_keys)
        raise BadRow("bad_schema", f"needs {keys}; got keys {sorted(row)}")
    return [{"role": "user", "content": prompt}]


def sft_messages(row: Any) -> list[dict[str, str]]:
    """A row as a chat that ends with an assistant turn; raises BadRow."""
    msgs = _messages(row, answer_keys=("response",))
    if "messages" not in row or row["messages"] is None:
        resp = row.get("response")
        if not isinstance(resp, str):
            raise BadRow("bad_schema", "a 'prompt' row needs a string 'response'")
        msgs = msgs + [{"role": "assistant", "content": resp}]
    if not any(m["role"] == "assistant" for m in msgs) or msgs[-1]["role"] != "assistant":
        raise BadRow("no_assistant", "the chat must end with an assistant turn")
    if msgs[0]["role"] == "assistant":
        raise BadRow("bad_schema", "the chat starts with an assistant turn; nothing prompts it")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise BadRow("empty_response", "an assistant turn is empty")
    return msgs


def prompt_messages(row: Any) -> list[dict[str, str]]:
    """The chat before the answer (for generation): an SFT row without its final assistant turn, or a DPO prompt."""
    msgs = _messages(row, answer_keys=())
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise BadRow("bad_schema", "no prompt before the answer")
    return msgs


def reference_answer(row: Any) -> str | None:
    """The text a task metric compares against: ``reference`` if the row has one, else the final answer."""
    if isinstance(row, dict):
        if isinstance(row.get("reference"), (str, int, float)):
            return str(row["reference"])
        if isinstance(row.get("response"), str):
            return row["response"]
        msgs = row.get("messages")
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            return msgs[-1].get("content")
    return None


# ------------------------------------------------------------------------------------------------ rendering


def labels_from_mask(ids: list[int], mask: list[bool]) -> tuple[list[int], list[int]]:
    """(inputs, labels): inputs = ids[:-1]; labels[t] = ids[t+1] where mask[t+1], else IGNORE."""
    return ids[:-1], [i if m else IGNORE for i, m in zip(ids[1:], mask[1:])]


def render_sft_row(row: Any, tok: Any, max_len: int) -> tuple[list[int], list[int]]:
    """One SFT row → (inputs, labels) of equal length ≤ max_len; raises BadRow."""
    msgs = sft_messages(row)
    try:
        ids, mask = tok.render_chat(msgs)
    except ValueError as e:
        raise BadRow("bad_schema", str(e)) from e
    if len(ids) - 1 > max_len:
        raise BadRow("too_long", f"{len(ids)} tokens > {max_len + 1}")
    inputs, labels = labels_from_mask(ids, mask)
    if all(x == IGNORE for x in labels):
        raise BadRow("empty_response", "no assistant token to train on")
    return inputs, labels


def render_answer(prompt: list[dict[str, str]], answer: str, tok: Any, max_len: int) -> tuple[list[int], list[int]]:
    """prompt chat + one assistant answer → (inputs, labels) with only the answer labelled."""
    n_prompt = len(tok.render_chat(prompt, add_generation_prompt=True)[0])
    ids, mask = tok.render_chat(prompt + [{"role": "assistant", "content": answer}])
    if len(ids) - 1 > max_len:
        raise BadRow("too_long", f"{len(ids)} tokens > {max_len + 1}")
    mask = [m and i >= n_prompt for i, m in enumerate(mask)]
    return labels_from_mask(ids, mask)


def render_pair(row: Any, tok: Any, max_len: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """One DPO row → (chosen inputs, chosen labels, rejected inputs, rejected labels); raises BadRow."""
    prompt = prompt_messages(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise BadRow("bad_schema", "a preference row needs string 'chosen' and 'rejected'")
    if not chosen.strip() or not rejected.strip():
        raise BadRow("empty_response", "chosen or rejected is empty")
    if chosen == rejected:
        raise BadRow("identical_pair", "chosen == rejected teaches nothing")
    try:
        return (*render_answer(prompt, chosen, tok, max_len), *render_answer(prompt, rejected, tok, max_len))
    except ValueError as e:
        if isinstance(e, BadRow):
            raise
        raise BadRow("bad_schema", str(e)) from e


@dataclass
class Rendered:
    """Rendered rows plus what was dropped, by reason."""

    rows: list[tuple[list[int], ...]]
    kept_index: list[int]
    """Index in the source file of each kept row."""
    dropped: Counter

    def drop_metrics(self, prefix: str) -> dict[str, int]:
        out = {f"{prefix}_rows": len(self.rows)}
        out.update({f"{prefix}_dropped_{r}": int(self.dropped.get(r, 0)) for r in DROP_REASONS})
        return out


def render_all(rows: list[Any], render, tok: Any, max_len: int) -> Rendered:
    kept, index, dropped = [], [], Counter()
    for i, row in enumerate(rows):
        try:
            kept.append(render(row, tok, max_len))
            index.append(i)
        except BadRow as e:
            dropped[e.reason] += 1
    return Rendered(kept, index, dropped)


def save_rendered(rendered: Rendered, path: str | Path, columns: tuple[str, ...],
                  extra: dict[str, list[float]] | None = None) -> Path:
    """Rendered rows as a Parquet file (list<int32> columns, plus float columns in ``extra``) for the workers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data: dict[str, Any] = {"idx": pa.array(np.arange(len(rendered.rows), dtype=np.int64))}
    for c, name in enumerate(columns):
        data[name] = pa.array([r[c] for r in rendered.rows], type=pa.list_(pa.int32()))
    for name, values in (extra or {}).items():
        data[name] = pa.array(values, type=pa.float64())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), p)
    return p


# ------------------------------------------------------------------------------------------------ batching


def pad_right(seqs: list[list[int]], value: int) -> Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def pack_groups(sizes: list[tuple[int, ...]], max_len: int, window: int = 64) -> list[list[int]]:
    """Greedy first-fit packing of rows into bins of ``max_len`` tokens per lane → each bin's row indices, in order.

    ``sizes[i]`` holds row i's length in each lane: ``(len,)`` for SFT, ``(chosen, rejected)`` for DPO, whose
    chosen and rejected sequences go to two rows packed in step. A row goes into the first of the last ``window``
    bins where every lane has room, else opens a bin. First-fit rather than next-fit: it fills the gaps next-fit
    leaves (measured on tests/sft_task.py in docs/INTERFACES.md); the window keeps it O(rows · window) and the data
    order nearly as given (a row moves at most ``window`` bins earlier); no sorting, so long and short rows stay mixed
    as they come. Every size must be ≤ max_len (rendering drops longer rows as ``too_long``)."""
    bins: list[list[int]] = []
    room: list[list[int]] = []
    for i, size in enumerate(sizes):
        if max(size) > max_len:
            raise ValueError(f"row {i} has {max(size)} tokens > max_len {max_len}")
        for b in range(max(0, len(bins) - window), len(bins)):
            if all(n <= r for n, r in zip(size, room[b])):
                break
        else:
            b = len(bins)
            bins.append([])
            room.append([max_len] * len(size))
        bins[b].append(i)
        room[b] = [r - n for r, n in zip(room[b], size)]
    return bins


Segment = tuple[list[int], list[int]]
"""One rendered sequence: (inputs, labels) of equal length."""


def collate(rows: list[list[Segment]], pad_id: int, packed: bool) -> dict[str, Tensor]:
    """Batch rows, each the concatenation of its segments (one segment per row when not packed), right-padded:
    ``tokens`` (B, T), ``labels`` (B, T) (pads: IGNORE), ``doc`` (B, T) the segment each token belongs to, numbered
    0, 1, … through the batch row by row (pads: -1); packed batches also get ``positions`` (B, T), restarting at 0 at
    every segment (pads: 0), which the loss pairs with a document mask built from ``doc``."""
    cat = [[t for seg in row for t in seg[k]] for k in (0, 1) for row in rows]
    b = len(rows)
    starts = np.cumsum([0] + [len(row) for row in rows])
    doc = [[int(starts[r]) + k for k, seg in enumerate(row) for _ in seg[0]] for r, row in enumerate(rows)]
    out = {"tokens": pad_right(cat[:b], pad_id), "labels": pad_right(cat[b:], IGNORE), "doc": pad_right(doc, -1)}
    if packed:
        out["positions"] = pad_right([[p for seg in row for p in range(len(seg[0]))] for row in rows], 0)
    return out


class SftRows:
    """RowSource over a rendered SFT Parquet file: batch → ``collate``'s dict (tokens, labels, doc (B, T); positions
    when packed), right-padded (pads carry label -100, and causal attention keeps them from touching real positions).

    ``pack_len`` > 0 packs the file's conversations into rows of at most that many tokens (``pack_groups``) and an
    index addresses a packed row; 0 = one conversation per row."""

    def __init__(self, path: str | Path, pad_id: int = 0, pack_len: int = 0) -> None:
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        self.inputs = t.column("inputs").to_pylist()
        self.labels = t.column("labels").to_pylist()
        self.packed = pack_len > 0
        self.groups = row_groups([(len(x),) for x in self.inputs], pack_len)
        self.num_rows = len(self.groups)
        self.pad_id = pad_id

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        groups = [self.groups[int(i) % self.num_rows] for i in indices]
        rows = [[(self.inputs[j], self.labels[j]) for j in g] for g in groups]
        return {k: v.to(device) for k, v in collate(rows, self.pad_id, self.packed).items()}


def collate_pairs(pairs: list[tuple[list[int], ...]], groups: list[list[int]], pad_id: int,
                  packed: bool) -> dict[str, Tensor]:
    """``collate`` of rendered pairs (c_inputs, c_labels, r_inputs, r_labels): row i of the first half holds the
    chosen sequences of ``groups[i]``, row i of the second half their rejected ones, in the same order."""
    rows = [[(pairs[j][2 * side], pairs[j][2 * side + 1]) for j in g] for side in (0, 1) for g in groups]
    return collate(rows, pad_id, packed)


class PairRows:
    """RowSource over a rendered preference Parquet file: batch → chosen rows then rejected rows stacked
    (``collate_pairs``' dict with (2B, T) tensors, plus "ref" (2P,) the reference sequence log-probs of the batch's
    P chosen segments then its P rejected segments, in ``doc`` order).

    ``pack_len`` > 0 packs pairs: packed row i of the chosen half holds the chosen answers of the same pairs, in the
    same order, as row i of the rejected half, each half at most ``pack_len`` tokens, so chosen segment k and
    rejected segment P + k are one pair; 0 = one pair per row (P = B)."""

    def __init__(self, path: str | Path, pad_id: int = 0, pack_len: int = 0) -> None:
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        self.pairs = list(zip(*(t.column(c).to_pylist() for c in ("c_inputs", "c_labels", "r_inputs", "r_labels"))))
        self.ref = (np.asarray(t.column("ref_chosen").to_pylist()), np.asarray(t.column("ref_rejected").to_pylist())) \
            if "ref_chosen" in t.column_names else None
        self.packed = pack_len > 0
        self.groups = pair_groups(self.pairs, pack_len)
        self.num_rows = len(self.groups)
        self.pad_id = pad_id

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        groups = [self.groups[int(i) % self.num_rows] for i in indices]
        out = {k: v.to(device) for k, v in collate_pairs(self.pairs, groups, self.pad_id, self.packed).items()}
        if self.ref is not None:
            pairs = [j for g in groups for j in g]
            out["ref"] = torch.tensor(np.concatenate([self.ref[0][pairs], self.ref[1][pairs]]), dtype=torch.float32,
                                      device=device)
        return out


def row_groups(sizes: list[tuple[int, ...]], pack_len: int) -> list[list[int]]:
    """Rendered rows per batch row: ``pack_groups`` over their lane lengths when ``pack_len`` > 0, else one each."""
    return pack_groups(sizes, pack_len) if pack_len > 0 else [[i] for i in range(len(sizes))]


def pair_groups(pairs: list[tuple[list[int], ...]], pack_len: int) -> list[list[int]]:
    """Pairs per row: ``row_groups`` over (chosen, rejected) lengths."""
    return row_groups([(len(p[0]), len(p[2])) for p in pairs], pack_len)
