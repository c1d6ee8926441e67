"""The training loop's row sources: idx-addressed rows (``RowSource``: parquet shards, SFT/DPO rows) and rows streamed
from a dataset shard (``StreamRows``), both behind ``TrainSource``, each with an exact, resumable position.

Streamed rows: the driver (jobs/trainer.py) gives TorchTrainer the packed training split as a Ray Dataset of rows
{idx, tokens} (one block per parquet shard, ``jobs.trainer.train_dataset``) and ``ray.train.DataConfig(
datasets_to_split=["train"], execution_options=preserve_order)``; Ray Data's streaming split deals the split's blocks
out to the workers, so a worker holds a few blocks at a time, never the corpus. ``StreamRows`` turns a worker's shard
(anything with ``iter_batches(batch_size=, batch_format="pyarrow", prefetch_batches=)``: a Ray DataIterator that
jobs/trainer.stream_rows passes in, or a test's fake) into micro-batches; nothing here imports Ray.

How the data position stays exact although the split is dynamic (which worker gets which block is decided while
streaming, and differs with the number of workers):

- every worker notes the ``idx`` of each row it trains on in the current epoch; at a checkpoint the workers
  all-gather those notes and the checkpoint stores the epoch and the global set of done rows (``IdxSet``: sorted
  ranges, a few numbers per block);
- a (re)started worker skips the rows in that set. This holds alike for a worker-group restart inside one fit()
  (Ray Train builds a fresh split for the new group), a rerun driver and another number of workers. The rows
  trained on after the checkpoint are trained on again, with the steps after it: the same replay as the weights;
- every step starts with an agreement (``all_reduce`` MIN): either every worker has a whole step's rows, or the
  epoch is at its tail. Then every worker drains its shard, the rest is all-gathered, sorted by idx and dealt out
  step by step identically on every worker, so all FSDP ranks run the same number of steps. The tail holds what the
  workers have left when the first runs out: the uneven remainder of the equal split plus what skipping done rows
  unbalanced, typically at most a block (a parquet shard, ``data.rows_per_shard`` rows) per worker;
- what an epoch can drop: the tail's last < batch_size rows (less than one step), and the last (N mod workers)
  rows, which Ray's equal split — the one DataConfig uses — never emits. ``dropped`` counts both (from the split
  size N, when given).

Index-addressed sources (``ParquetRows`` for validation, training/sft_data.SftRows/PairRows for SFT/DPO, benchmarks'
synthetic rows) get the same small interface from ``IndexedSource``; ``as_train_source`` picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor


def micro_batch_indices(consumed: int, accum_step: int, rank: int, world: int, micro: int) -> np.ndarray:
    """Global row indices of one micro-batch: the step's rows consumed .. consumed + micro·world·accum - 1 are dealt
    out micro-batch by micro-batch, rank-major within each accumulation step (wrapping is the source's job)."""
    return consumed + (accum_step * world + rank) * micro + np.arange(micro)


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


class TrainSource(Protocol):
    """What the training loop asks of its data: micro-batches in order, and a data position for the checkpoint."""

    def micro_batch(self, consumed: int, accum_step: int, device: torch.device) -> Any:
        """Micro-batch ``accum_step`` of this rank for the step that starts after ``consumed`` rows (global).
        Called on every rank for accum_step = 0, 1, … of each step, in order."""
        ...

    def state(self) -> dict[str, Any]:
        """Collective (every rank, at the same step): the data position to store in the checkpoint (JSON)."""
        ...

    def restore(self, train_state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's train state (``None``: from the start)."""
        ...

    # An on-policy source (jobs/grpo.RolloutSource) also has ``bind_policy(model, worker)``: the loop hands it the
    # live model and its worker before ``restore``, and the source samples its rows from that model.


class IndexedSource:
    """An idx-addressed row source behind the TrainSource interface: step s reads rows consumed .. consumed +
    batch_size - 1 (``micro_batch_indices``), so the loop's ``consumed`` count is the whole position."""

    def __init__(self, rows: Any, rank: int, world: int, micro_batch_size: int) -> None:
        self.rows, self.rank, self.world, self.micro = rows, rank, world, micro_batch_size

    def micro_batch(self, consumed: int, accum_step: int, device: torch.device) -> Any:
        return self.rows.batch(micro_batch_indices(consumed, accum_step, self.rank, self.world, self.micro), device)

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, train_state: dict[str, Any] | None) -> None:
        pass


def as_train_source(src: Any, rank: int, world: int, micro_batch_size: int) -> TrainSource:
    """``src`` itself when it streams (has ``micro_batch``), else the idx-addressed ``src`` wrapped in IndexedSource."""
    return src if hasattr(src, "micro_batch") else IndexedSource(src, rank, world, micro_batch_size)


# ------------------------------------------------------------------------------------------------ done rows


class IdxSet:
    """A set of row idx kept as sorted, disjoint, non-adjacent half-open ranges [start, stop).

    The rows a run has trained on are long runs (each worker reads its blocks in order), so a checkpoint stores a few
    numbers per block, not one per row."""

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        merged: list[list[int]] = []
        for a, b in sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a)):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self._ranges = merged
        self._starts = np.array([a for a, _ in merged], dtype=np.int64)
        self._stops = np.array([b for _, b in merged], dtype=np.int64)

    @classmethod
    def of(cls, idx: Iterable[int] | np.ndarray) -> IdxSet:
        u = np.unique(np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64))
        if not len(u):
            return cls()
        breaks = np.flatnonzero(np.diff(u) != 1) + 1
        starts, stops = u[np.r_[0, breaks]], u[np.r_[breaks - 1, len(u) - 1]] + 1
        return cls(zip(starts.tolist(), stops.tolist()))

    def union(self, *others: IdxSet) -> IdxSet:
        return IdxSet([r for s in (self, *others) for r in s._ranges])

    def contains(self, idx: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``idx`` are in the set."""
        idx = np.asarray(idx, dtype=np.int64)
        j = np.searchsorted(self._starts, idx, side="right") - 1
        return (j >= 0) & (idx < self._stops[np.maximum(j, 0)]) if len(self._starts) else np.zeros(len(idx), bool)

    def ranges(self) -> list[list[int]]:
        return [list(r) for r in self._ranges]

    def __len__(self) -> int:
        return int((self._stops - self._starts).sum())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdxSet) and self._ranges == other._ranges

    def __repr__(self) -> str:
        return f"IdxSet({self._ranges})"


# ------------------------------------------------------------------------------------------------ the stream


class _Rows:
    """A run of rows: idx (n,) int64 and tokens (n, T+1) int32."""

    def __init__(self, idx: np.ndarray | None = None, tokens: np.ndarray | None = None) -> None:
        self.idx = np.empty(0, np.int64) if idx is None else idx
        self.tokens = np.empty((0, 0), np.int32) if tokens is None else tokens

    def __len__(self) -> int:
        return len(self.idx)

    @staticmethod
    def concat(parts: Sequence[_Rows]) -> _Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return _Rows()
        return _Rows(np.concatenate([p.idx for p in parts]), np.concatenate([p.tokens for p in parts]))

    def select(self, positions: np.ndarray | slice) -> _Rows:
        return _Rows(self.idx[positions], self.tokens[positions])


def rows_from_arrow(table: Any) -> _Rows:
    """Rows of a pyarrow table {idx, tokens} (a packed split's parquet shard, or a slice of one)."""
    idx = table.column("idx").to_numpy().astype(np.int64)
    if not len(idx):
        return _Rows()
    tok = table.column("tokens").combine_chunks()
    flat = tok.flatten().to_numpy(zero_copy_only=False).astype(np.int32)  # flatten() honours slicing; .values not
    return _Rows(idx, flat.reshape(len(idx), -1))


class StreamRows:
    """This worker's share of a Ray Train dataset shard, as micro-batches (B, T+1) of token rows; see the module
    docstring for how the position stays exact. Built on the worker (LoopSpec.make_train_source): ``shard`` is this
    worker's shard of the split (jobs/trainer.stream_rows passes ``ray.train.get_dataset_shard("train")``)."""

    def __init__(self, micro_batch_size: int, batch_size: int, shard: Any, *, num_rows: int | None = None) -> None:
        self.micro = micro_batch_size
        """Rows per micro-batch on one worker."""
        self.batch_size = batch_size
        """Rows per optimizer step, all workers together."""
        self.num_rows = num_rows
        """Rows in the split (to count what an epoch dropped); None: unknown."""
        self._shard = shard
        self.epoch = 0
        """Epochs completed."""
        self.done = IdxSet()
        """Rows of the current epoch trained on by any rank, as of the last sync (a checkpoint or restore)."""
        self.dropped = 0
        """Rows left out of completed epochs (each < one step + the equal split's remainder)."""
        self._mine: list[np.ndarray] = []  # idx this rank trained on since the last sync
        self._it: Iterator[Any] | None = None  # this epoch's batches from the shard
        self._exhausted = False
        self._buf = _Rows()  # rows pulled from the shard, not yet trained on
        self._pool: _Rows | None = None  # the epoch's tail, the same on every rank
        self._step: _Rows = _Rows()  # this rank's rows of the current step
        self._rank = self._world = -1

    # -- the interface --------------------------------------------------------------------------------------------

    def micro_batch(self, consumed: int, accum_step: int, device: torch.device) -> Tensor:
        if accum_step == 0:
            self._step = self._next_step(device)
            self._mine.append(self._step.idx)
        rows = self._step.select(slice(accum_step * self.micro, (accum_step + 1) * self.micro))
        return torch.from_numpy(rows.tokens.astype(np.int64)).to(device, non_blocking=True)

    @property
    def step_idx(self) -> np.ndarray:
        """The idx of the rows this rank trains on in the current (or just finished) step, of epoch ``epoch``."""
        return self._step.idx

    def state(self) -> dict[str, Any]:
        self._sync()
        return {"epoch": self.epoch, "done": self.done.ranges(), "dropped": self.dropped}

    def restore(self, train_state: dict[str, Any] | None) -> None:
        if not train_state:
            return
        data = train_state.get("data")
        if data:
            self.epoch, self.done, self.dropped = int(data["epoch"]), IdxSet(data["done"]), int(data.get("dropped", 0))
        elif self.num_rows and train_state.get("consumed"):  # a checkpoint of the idx-addressed loop: rows 0..c-1
            c = int(train_state["consumed"])
            self.epoch, self.done = c // self.num_rows, IdxSet([(0, c % self.num_rows)])

    # -- internals ------------------------------------------------------------------------------------------------

    def _dist(self) -> tuple[int, int]:
        import torch.distributed as dist

        if self._rank < 0:
            self._rank, self._world = dist.get_rank(), dist.get_world_size()
            if self.batch_size % (self.micro * self._world):
                raise ValueError(f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro} "
                                 f"× {self._world} workers")
        return self._rank, self._world

    def _gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self._dist()[1]
        dist.all_gather_object(out, obj)
        return out

    def _all(self, flag: bool, device: torch.device) -> bool:
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def _pull(self) -> bool:
        """Add the shard's next batch (less the done rows) to the buffer; False once this epoch's shard is over."""
        if self._exhausted:
            return False
        if self._it is None:
            self._it = iter(self._shard.iter_batches(batch_size=self.micro, batch_format="pyarrow", prefetch_batches=1))
        batch = next(self._it, None)
        if batch is None:
            self._exhausted = True
            return False
        rows = rows_from_arrow(batch)
        if len(self.done):
            rows = rows.select(~self.done.contains(rows.idx))
        self._buf = _Rows.concat([self._buf, rows])
        return True

    def _next_step(self, device: torch.device) -> _Rows:
        """This rank's rows of the next step (collective: every rank, every step)."""
        rank, world = self._dist()
        need = self.batch_size // world
        while True:
            if self._pool is None:
                while len(self._buf) < need and self._pull():
                    pass
                if self._all(len(self._buf) >= need, device):
                    mine, self._buf = self._buf.select(slice(0, need)), self._buf.select(slice(need, None))
                    return mine
                while self._pull():  # the epoch's tail: pool what every rank has left
                    pass
                tail = _Rows.concat(self._gather(self._buf))
                self._pool, self._buf = tail.select(np.argsort(tail.idx, kind="stable")), _Rows()
            if len(self._pool) >= self.batch_size:
                step, self._pool = self._pool.select(slice(0, self.batch_size)), self._pool.select(
                    slice(self.batch_size, None))
                accum = need // self.micro  # the layout of micro_batch_indices: rank-major within each accum step
                pos = np.concatenate([(a * world + rank) * self.micro + np.arange(self.micro) for a in range(accum)])
                return step.select(pos)
            self._end_epoch(len(self._pool))

    def _end_epoch(self, left: int) -> None:
        self._sync()
        trained = len(self.done)
        if trained == 0:
            raise ValueError(f"the training split has fewer rows than one step ({left} < batch_size="
                             f"{self.batch_size})")
        self.dropped += self.num_rows - trained if self.num_rows else left
        self.epoch += 1
        self.done, self._pool, self._buf, self._it, self._exhausted = IdxSet(), None, _Rows(), None, False

    def _sync(self) -> None:
        """Collective: merge every rank's trained-on idx into ``done``."""
        mine = IdxSet.of(np.concatenate(self._mine) if self._mine else np.empty(0, np.int64))
        self.done = self.done.union(*(IdxSet(r) for r in self._gather(mine.ranges())))
        self._mine = []
