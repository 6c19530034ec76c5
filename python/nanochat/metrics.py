"""Training metrics: one JSON object per line in RUN/metrics.jsonl, and a RUN/loss.png plot of it.

Each record has a "kind" ("train", "eval" or "event") and a "step". On resume the records past the
checkpoint's step are dropped, so the file and the plot describe one consistent run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def _finite_or_none(v):
    # JSON has no inf/nan; keep the line parseable and show the gap in the plot instead
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a kill is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    """Appends records to RUN/metrics.jsonl and redraws RUN/loss.png on demand."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.plot_path = self.run_dir / "loss.png"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")  # a fresh run starts a fresh log
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def log(self, kind: str, step: int, **values) -> dict:
        record = {"kind": kind, "step": step, **{k: _finite_or_none(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def plot(self) -> None:
        plot_metrics(self.path, self.plot_path)

    def close(self) -> None:
        self._file.close()


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> None:
    """Train loss and val loss against step (left), val bits per byte (right); written atomically."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss", alpha=0.6, linewidth=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        bpb = [(r["step"], r["val_bpb"]) for r in evals if r.get("val_bpb") is not None]
        if bpb:
            ax_bpb.plot(*zip(*bpb), "o-", color="tab:green")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax_bpb.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(".loss.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
