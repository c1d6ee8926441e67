"""Run every choice of a request on an engine concurrently and hand back their deltas in coalesced batches.

After the first batch (sent at once: time to first token is not traded), deltas that arrive within
``interval_s`` of the previous batch go out together — one HTTP write instead of one per token through Serve's
proxy. If the consumer leaves early (client disconnect, error, timeout), every generation still running is aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from actors.engines import Delta, Engine, GenParams

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Choice:
    """One sample of a request: its index in the response, its prompt's token ids, how it is sampled (n=1)."""

    index: int
    prompt_ids: list[int]
    params: GenParams


_DONE = object()


async def coalesced(engine: Engine, choices: list[Choice], rid: str, interval_s: float = 0.0,
                    on_release: Callable[[], None] | None = None) -> AsyncIterator[list[tuple[int, Delta]]]:
    """Yield lists of (choice index, delta) — all that is ready, at most one list per ``interval_s``.
    ``on_release`` runs once everything has stopped (the request's bookkeeping)."""
    queue: asyncio.Queue = asyncio.Queue()
    loop, last = asyncio.get_running_loop(), float("-inf")

    async def pump(c: Choice) -> None:
        try:
            async for d in engine.stream(c.prompt_ids, c.params, f"{rid}-{c.index}"):
                await queue.put((c.index, d))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            await queue.put((c.index, e))
        finally:
            await queue.put((c.index, _DONE))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    left = len(tasks)
    try:
        while left:
            batch = [await queue.get()]
            wait = interval_s - (loop.time() - last)
            if wait > 0:  # the first batch (last = -inf) never waits
                await asyncio.sleep(wait)
            while not queue.empty():
                batch.append(queue.get_nowait())
            out = []
            for index, item in batch:
                if item is _DONE:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    out.append((index, item))
            if out:
                yield out
                last = loop.time()
    finally:  # in its own task: a second cancellation of the request must not skip the bookkeeping
        await asyncio.shield(asyncio.ensure_future(_release(engine, choices, tasks, rid, on_release)))


async def _release(engine: Engine, choices: list[Choice], tasks: list[asyncio.Task], rid: str,
                   on_release: Callable[[], None] | None) -> None:
    """Abort what is still generating (the consumer left early), then run the caller's bookkeeping."""
    try:
        for c, t in zip(choices, tasks):
            if not t.done():
                log.debug("aborting %s-%d", rid, c.index)
                await engine.abort(f"{rid}-{c.index}")
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if on_release is not None:
            on_release()
