"""Training metrics: one CSV row and TensorBoard scalars per step, and a final report with a loss-curve PNG.

Rank 0 writes ``<run>/metrics/metrics.csv`` and ``<run>/metrics/events.*`` (TensorBoard, via tensorboardX).
On resume the CSV keeps only rows up to the restored step, so the step column stays continuous without duplicates.
The driver's progress bar polls the same CSV (``CsvProgress``).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "val_loss", "val_ppl",
          "consumed", "world_size", "time"]


class MetricsWriter:
    """CSV + TensorBoard on rank 0; a no-op object on other ranks (``enabled=False``).

    CSV columns: FIELDS, then every other key the rows bring (fine-tuning statistics, trainable_params,
    val_task_accuracy …) in order of first appearance; a new key rewrites the file under the wider header."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.dir = Path(out_dir)
        self.csv_path = self.dir / "metrics.csv"
        self.fields = list(FIELDS)
        self._tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_csv(self.csv_path) if int(r["step"]) <= resume_step] if resume_step else []
        self.fields += [k for k in (kept[0] if kept else {}) if k not in self.fields]
        self._rewrite(kept)  # drop rows past the restored step
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # e.g. the GPU image: torch's own writer, or CSV only
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
        self._tb = SummaryWriter(str(self.dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {**row, "time": round(time.time(), 3)}
        new = [k for k in row if k not in self.fields]
        if new:
            self.fields += new
            self._rewrite(read_csv(self.csv_path))
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: _fmt(k, row.get(k)) for k in self.fields})
        if self._tb is None:
            return
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and v == v:
                self._tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, row["step"])
        self._tb.flush()

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        tmp = self.csv_path.with_suffix(".tmp")  # replaced in one go: the driver's progress bar reads the file
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in self.fields} for r in rows)
        tmp.replace(self.csv_path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(key: str, v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):  # 6 significant digits, but a wall-clock time needs milliseconds of a 10-digit epoch
        return f"{v:.3f}" if key == "time" else f"{v:.6g}"
    return v


def read_csv(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def parse_csv(text: str | None) -> list[dict[str, str]]:
    """The rows of a metrics CSV given as text (None: no file yet)."""
    return list(csv.DictReader(io.StringIO(text, newline=""))) if text else []


def _floats(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(key) not in (None, ""):
            xs.append(int(r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def write_report(metrics_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """``report.json`` + ``report.md`` + ``loss.png`` in ``metrics_dir`` from its CSV; returns the JSON path."""
    from core.report import png

    d = Path(metrics_dir)
    rows = read_csv(d / "metrics.csv")
    if not rows:
        raise FileNotFoundError(f"{d / 'metrics.csv'}: no rows to report on")
    steps, loss = _floats(rows, "loss")
    vsteps, vloss = _floats(rows, "val_loss")
    _, tps = _floats(rows, "tokens_per_s")
    _, mfu = _floats(rows, "mfu")
    _, real_tps = _floats(rows, "real_tokens_per_s")
    _, share = _floats(rows, "real_token_share")
    with png(d / "loss.png", size=(7, 4)) as ax:
        ax.plot(steps, loss, label="train loss")
        if vloss:
            ax.plot(vsteps, vloss, "o-", label="val loss")
        ax.set(xlabel="step", ylabel="cross-entropy (nats)")
        ax.legend()
        ax.grid(alpha=0.3)

    def median(xs: list[float]) -> float | None:
        return sorted(xs)[len(xs) // 2] if xs else None

    report = {"steps": len(rows), "last_step": steps[-1] if steps else None,
              "first_loss": loss[0] if loss else None, "final_loss": loss[-1] if loss else None,
              "final_val_loss": vloss[-1] if vloss else None,
              "final_val_ppl": math.exp(vloss[-1]) if vloss else None,
              "median_tokens_per_s": median(tps), "median_mfu": median(mfu),
              "median_real_tokens_per_s": median(real_tps), "median_real_token_share": median(share), **(extra or {})}
    (d / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# Training report", "", "![loss](loss.png)", ""] + [f"- {k}: {v}" for k, v in report.items()]
    (d / "report.md").write_text("\n".join(lines) + "\n")
    return d / "report.json"


class CsvProgress:
    """A tqdm bar on the driver that follows rank 0's CSV (Ray Train callbacks run in the controller actor,
    not in the driver, so the driver polls the file instead). ``source``: the CSV's path, or a function returning
    its text (a run on object storage: the copy rank 0 uploads at each evaluation and checkpoint)."""

    def __init__(self, source: str | Path | Callable[[], str | None], total: int, *, start: int = 0,
                 desc: str = "train") -> None:
        from tqdm import tqdm

        self.read = (lambda: parse_csv(source())) if callable(source) else functools.partial(read_csv, source)
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        self.seen = start

    def poll(self) -> None:
        rows = self.read()
        if not rows:
            return
        last = rows[-1]
        step = int(last["step"])
        if step > self.seen:
            self.bar.update(step - self.seen)
            self.seen = step
        self.bar.set_postfix(loss=last["loss"], tok_s=last["tokens_per_s"])

    def close(self) -> None:
        self.poll()
        self.bar.close()
