"""The streamed data position (training/data_stream.py) without Ray Train: IdxSet, skipping done rows, the epoch tail,
restore. Shards are stand-ins yielding pyarrow batches like a Ray DataIterator; ranks are real gloo processes.
The same code under Ray Train, with a killed worker, a killed driver and 2 → 1 workers: tests/test_pretrain.py."""

from __future__ import annotations

import socket

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.data_stream import IdxSet, IndexedSource, StreamRows, as_train_source

WIDTH = 3  # tokens per row; every token of row i is i, so a batch shows which rows it holds


class FakeShard:
    """A worker's shard: the same rows every epoch, in order, as pyarrow batches; counts the epochs started."""

    def __init__(self, idx) -> None:
        self.idx = np.asarray(idx, dtype=np.int64)
        self.epochs = 0

    def iter_batches(self, *, batch_size: int, batch_format: str, prefetch_batches: int):
        assert batch_format == "pyarrow"
        self.epochs += 1
        for i in range(0, len(self.idx), batch_size):
            chunk = self.idx[i:i + batch_size]
            yield pa.table({"idx": chunk, "tokens": pa.array([[int(j)] * WIDTH for j in chunk],
                                                             type=pa.list_(pa.int32()))})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank():
    """A world of one gloo rank in this process (StreamRows' collectives are then trivial)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_steps(src: StreamRows, steps: int, accum: int, start: int = 0) -> list[list[int]]:
    """Row idx of each step, as the training loop asks for them (micro-batches 0..accum-1)."""
    out = []
    for s in range(start, start + steps):
        rows = [src.micro_batch(s * src.batch_size, a, torch.device("cpu")) for a in range(accum)]
        batch = torch.cat(rows)
        assert batch.dtype == torch.int64 and batch.shape == (src.batch_size // dist.get_world_size(), WIDTH)
        out.append(batch[:, 0].tolist())
    return out


def test_idxset_ranges_union_contains():
    s = IdxSet.of([5, 3, 4, 9, 10, 0])
    assert s.ranges() == [[0, 1], [3, 6], [9, 11]] and len(s) == 6
    assert IdxSet.of([]).ranges() == [] and len(IdxSet()) == 0
    u = s.union(IdxSet([[1, 3]]), IdxSet([[11, 12], [20, 20]]))  # adjacent ranges merge, empty ones vanish
    assert u.ranges() == [[0, 6], [9, 12]]
    assert u.contains(np.array([0, 5, 6, 8, 9, 11, 12, -1])).tolist() == [True, True, False, False, True, True,
                                                                           False, False]
    assert not IdxSet().contains(np.array([0, 1])).any()
    assert IdxSet(u.ranges()) == u  # the checkpoint's JSON form round-trips


def test_index_sources_keep_their_layout():
    class Rows:
        def batch(self, indices, device):
            return indices

    src = as_train_source(Rows(), rank=1, world=2, micro_batch_size=2)
    assert isinstance(src, IndexedSource) and src.state() == {}
    assert src.micro_batch(8, 1, torch.device("cpu")).tolist() == [14, 15]  # consumed + (a·world + r)·micro
    stream = StreamRows(2, 4, shard=FakeShard([]))
    assert as_train_source(stream, 0, 1, 2) is stream


def test_skip_done_rows_and_epoch_rollover(one_rank):
    shard = FakeShard(range(10))
    src = StreamRows(2, 4, num_rows=10, shard=shard)
    steps = run_steps(src, 2, accum=2)
    assert steps == [[0, 1, 2, 3], [4, 5, 6, 7]]
    state = src.state()
    assert state == {"epoch": 0, "done": [[0, 8]], "dropped": 0}

    resumed = StreamRows(2, 4, num_rows=10, shard=FakeShard(range(10)))
    resumed.restore({"step": 2, "consumed": 8, "data": state})
    # rows 8, 9 are left: less than a step, so the epoch ends (dropping them) and the next starts from row 0
    assert run_steps(resumed, 3, accum=2, start=2) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert resumed.epoch == 2 and resumed.dropped == 2 + 2
    assert resumed.state()["done"] == [[0, 4]]
    # the uninterrupted run agrees step for step
    assert run_steps(src, 3, accum=2, start=2) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert shard.epochs == 3


def test_restore_from_a_checkpoint_of_the_idx_addressed_loop(one_rank):
    src = StreamRows(2, 4, num_rows=10, shard=FakeShard(range(10)))
    src.restore({"step": 3, "consumed": 12})  # no "data": rows 0..11 mod 10 were read
    assert src.epoch == 1 and src.done.ranges() == [[0, 2]]
    assert run_steps(src, 1, accum=2) == [[2, 3, 4, 5]]


def test_split_smaller_than_a_step_fails_clearly(one_rank):
    src = StreamRows(2, 4, num_rows=3, shard=FakeShard(range(3)))
    with pytest.raises(ValueError, match="fewer rows than one step"):
        run_steps(src, 1, accum=2)


def _two_ranks(rank: int, port: int, shards: list[list[int]], steps: int, restore: dict | None, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    src = StreamRows(2, 8, num_rows=40, shard=FakeShard(shards[rank]))
    src.restore(restore)
    got = run_steps(src, steps, accum=2)
    out.put((rank, got, src.state(), src.epoch))
    dist.destroy_process_group()


def _run_two(shards, steps, restore=None):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, shards, steps, restore, out)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return res


def test_uneven_shards_pool_their_tail_and_lose_less_than_a_step():
    # 40 rows, rank 0's shard is mostly done already (as after a resume), rank 1's is not: rank 0 runs short after
    # one step, the tails are pooled, and both ranks keep stepping together until fewer than 8 rows are left
    done = IdxSet([[0, 14]])
    shards = [list(range(0, 20)), list(range(20, 40))]
    res = _run_two(shards, steps=4, restore={"data": {"epoch": 0, "done": done.ranges(), "dropped": 0}})
    (_, got0, state0, epoch0), (_, got1, state1, epoch1) = res
    assert state0 == state1 and epoch0 == epoch1 == 1  # the ranks agree; the 4th step is the next epoch's
    trained = [i for s in range(3) for i in got0[s] + got1[s]]
    assert len(trained) == len(set(trained)) == 24  # 3 steps of 8 rows, none twice
    assert set(trained) | set(range(14)) == set(range(38))  # only the tail's last 2 rows (< a step) are lost...
    assert state0["dropped"] == 2  # ...and counted
    assert sorted(got0[3] + got1[3]) == list(range(0, 4)) + list(range(20, 24))  # epoch 1 starts afresh
