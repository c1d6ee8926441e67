"""PNG figures for the jobs' end-of-run reports (training loss, accuracy per stage and per round, RS scores).

Every report draws through ``png``: matplotlib without a display, one figure of one or more panels, saved and
closed — so a job's plotting code is only what it draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def png(path: str | Path, panels: int = 1, size: tuple[float, float] = (5, 3.5)) -> Iterator[Any]:
    """Yields the axes to draw on (one ``Axes``, or a list of ``panels`` side by side, each ``size`` inches), then
    lays the figure out and writes it to ``path`` (100 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(size[0] * panels, size[1]))
    try:
        yield axes if panels == 1 else list(axes)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
