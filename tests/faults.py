"""Fault injection and data records for the training tests, installed as step callbacks (``run.callbacks`` →
training/loop.LoopSpec.callbacks: ``module:function``, called on every worker after every optimizer step as
``function(step, StepContext)``). Nothing in the product calls these; the tests name them in their config, e.g.
``--set run.callbacks=[tests.faults:kill_before_step_15,tests.faults:record_consumed]``. They import on the workers
because the repository root is on their path (Ray adds the driver's working directory, and ``ray job submit
--working-dir .`` ships it)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

_attempt: int | None = None  # one id per worker group (this process's), from rank 0


def kill_before_step_15(step: int, ctx: Any) -> None:
    """The last worker SIGKILLs its own process once, after step 14 (so step 15 never runs in that group), leaving
    ``<metrics>/killed-at-15`` so that a restarted group does not do it again. It waits for Ray Train to take in
    the reports made so far first: "killed after a checkpoint"."""
    w = ctx.worker
    if step == 14 and _once(w, w.world - 1, "killed-at-15"):
        w.session.settle()
        os.kill(os.getpid(), signal.SIGKILL)


def hold_after_step_13(step: int, ctx: Any) -> None:
    """Rank 0 stops the run after step 13 until something kills the group (the test kills a node), once: it leaves
    ``<metrics>/held-at-13`` so that the restarted group runs through. "A node dies mid-run" then holds however fast
    the steps are (tests/test_cluster.py used a 4× larger model to stay mid-run long enough)."""
    if step == 13 and _once(ctx.worker, 0, "held-at-13"):
        time.sleep(900)  # the test's own deadline fails first if no kill comes


def _once(w: Any, rank: int, marker_name: str) -> bool:
    """True on worker ``rank`` the first time in a run (the run's ``<metrics>/marker_name`` is then left, so that a
    restarted group does not act again)."""
    if w.rank != rank or not w.spec.metrics_dir:
        return False
    marker = Path(w.spec.metrics_dir, marker_name)
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def record_consumed(step: int, ctx: Any) -> None:
    """Collective: every worker appends the idx of the rows it trained on in ``step`` (streamed pretraining rows:
    training/data_stream.StreamRows) to ``<metrics>/consumed-<attempt>-r<rank>.jsonl``; tests/test_pretrain.py's
    ``assert_data_exact`` checks them."""
    import torch.distributed as dist

    global _attempt
    w, src = ctx.worker, ctx.source
    if _attempt is None:
        ids: list[Any] = [None] * w.world
        dist.all_gather_object(ids, time.time_ns())
        _attempt = int(ids[0])
    path = Path(w.spec.metrics_dir, f"consumed-{_attempt}-r{w.rank}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"attempt": _attempt, "step": step, "epoch": src.epoch, "rank": w.rank, "world": w.world,
                            "idx": src.step_idx.tolist()}) + "\n")
