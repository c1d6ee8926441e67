"""The reference engine with a slow (re)start, for tests that need a replica's replacement to take a while (as a
vLLM engine's ≈45 s start does) without waiting that long.

A replica started while the model directory holds a ``slow_start_s`` file sleeps that many seconds before loading.
It lives in its own module (not in a test file) so Serve replicas can import it when they receive the class.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from actors.engines.reference import ReferenceEngine

MARKER = "slow_start_s"


class SlowStartEngine(ReferenceEngine):
    async def start(self, streaming: bool = False) -> None:
        marker = Path(self.model_dir) / MARKER
        if marker.is_file():
            await asyncio.sleep(float(marker.read_text()))
        await super().start(streaming)
