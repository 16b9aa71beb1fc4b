"""Metric sinks: `<workdir>/metrics.jsonl` (one JSON object per logged step), TensorBoard event
files, and a PNG of the training curves."""
from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard output is optional
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _py(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def read_metrics(path: str) -> list[dict]:
  """Rows of metrics.jsonl; when a resumed run re-logs a step, its latest row wins."""
  rows: dict[int, dict] = {}
  if not os.path.exists(path):
    return []
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
  return [rows[s] for s in sorted(rows)]


def plot_curves(metrics_path: str, png_path: str, title: str = "") -> str | None:
  rows = read_metrics(metrics_path)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
  fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.6), squeeze=False)
  ax = axes[0, 0]
  if loss:
    ax.plot(*zip(*loss), lw=1.2)
  ax.set_xlabel("step"); ax.set_ylabel("train loss"); ax.set_yscale("log"); ax.grid(alpha=.3)
  if evals:
    ax2 = axes[0, 1]
    for k in evals:
      pts = [(r["step"], r[k]) for r in rows if k in r]
      ax2.plot(*zip(*pts), marker="o", ms=3, label=k)
    ax2.set_xlabel("step"); ax2.set_ylim(-0.02, 1.02); ax2.grid(alpha=.3); ax2.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return png_path
