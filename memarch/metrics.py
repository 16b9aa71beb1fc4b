"""Metric sinks: `<workdir>/metrics.jsonl` (one JSON object per logged step), TensorBoard event
files, optionally Weights & Biases (train.wandb_project), and a PNG of the training curves."""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any


def wandb_module(project: str):
  """The `wandb` module when train.wandb_project is set (None when it is ''); imported lazily, so
  the package is never needed otherwise. A missing package is one line, raised before training."""
  if not project:
    return None
  try:
    import wandb
  except ImportError:
    raise ImportError(f"train.wandb_project={project!r} is set but the wandb package is not "
                      "installed; pip install wandb, or set --config.train.wandb_project='' to "
                      "log to metrics.jsonl and TensorBoard only") from None
  return wandb


class MetricWriter:
  """`wandb_run`: a started wandb run that every row is logged to as well (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, wandb_run=None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    _end_with_newline(self.path)
    self._wandb = wandb_run
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
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _end_with_newline(path: str) -> None:
  """A run killed in the middle of a write leaves a partial last row: end it, so the next row
  starts on its own line (read_metrics skips the partial one)."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
  if last != b"\n":
    with open(path, "a") as f:
      f.write("\n")


def _py(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def read_metrics(path: str) -> list[dict]:
  """Rows of metrics.jsonl; when a resumed run re-logs a step, its latest row wins. A row cut short
  by a killed run is skipped (with a warning)."""
  rows: dict[int, dict] = {}
  if not os.path.exists(path):
    return []
  broken = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          r = json.loads(line)
          step = int(r["step"])
        except (ValueError, KeyError, TypeError):
          broken.append(n)
          continue
        rows.setdefault(step, {}).update(r)
  if broken:
    warnings.warn(f"{path}: skipped {len(broken)} unreadable row(s) (line {broken[0]}"
                  f"{' ...' if len(broken) > 1 else ''}), e.g. cut short by a killed run")
  return [rows[s] for s in sorted(rows)]


def plot_curves(metrics_path: str, png_path: str, title: str = "") -> str | None:
  """Training loss (with eval/loss on the same axes), then one panel per other eval metric
  (accuracy on [0, 1]; bits per byte, perplexity on their own scales)."""
  rows = read_metrics(metrics_path)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  eval_loss = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  evals = sorted({k for r in rows for k in r if k.startswith("eval/")} - {"eval/loss"})
  n = 1 + len(evals)
  fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
  ax = axes[0, 0]
  if loss:
    ax.plot(*zip(*loss), lw=1.2, label="train/loss")
  if eval_loss:
    ax.plot(*zip(*eval_loss), marker="o", ms=3, label="eval/loss")
    ax.legend()
  ax.set_xlabel("step"); ax.set_ylabel("loss (nats per token)"); ax.set_yscale("log")
  ax.grid(alpha=.3)
  for ax2, k in zip(axes[0, 1:], evals):
    pts = [(r["step"], r[k]) for r in rows if k in r]
    ax2.plot(*zip(*pts), marker="o", ms=3, color="tab:orange")
    ax2.set_xlabel("step"); ax2.set_ylabel(k); ax2.grid(alpha=.3)
    if "accuracy" in k:
      ax2.set_ylim(-0.02, 1.02)
    elif k.endswith("perplexity"):
      ax2.set_yscale("log")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return png_path
