"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
import textwrap
from typing import Sequence


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, png_path: str, dpi: int = 100) -> str:
  """Lays out `fig`, writes it to `png_path` (creating its folder), closes it; returns the path."""
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  fig.savefig(png_path, dpi=dpi)
  _plt().close(fig)
  return png_path


def _wrap(title: str, width: int = 70) -> str:
  return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def heatmap(values, row_labels: Sequence[str], col_labels: Sequence[str], png_path: str, *,
            title: str = "", xlabel: str = "", ylabel: str = "", vmax: float = 1.0,
            fmt: str = "{:.2f}") -> str:
  """rows x cols grid of values in [0, vmax], each cell annotated; returns the path written."""
  plt = _plt()
  import numpy as np
  v = np.asarray(values, dtype=float)
  fig, ax = plt.subplots(figsize=(max(5.5, 1.5 + 0.9 * len(col_labels)),
                                  1.8 + 0.5 * len(row_labels)))
  im = ax.imshow(v, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
  ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
  for i in range(v.shape[0]):
    for j in range(v.shape[1]):
      ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center",
              color="black" if v[i, j] > 0.6 * vmax else "white", fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(_wrap(title), fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return save_figure(fig, png_path)


def bars(labels: Sequence[str], values: Sequence[float], png_path: str, *, title: str = "",
         ylabel: str = "accuracy") -> str:
  """One annotated bar per label (the MQAR accuracy table of a single model)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(labels), 3.2))
  ax.bar(range(len(labels)), values, color="tab:blue")
  for i, v in enumerate(values):
    ax.text(i, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0, 1.08)
  ax.set_ylabel(ylabel)
  ax.set_title(_wrap(title, 50), fontsize=8)
  return save_figure(fig, png_path)


def accuracy_vs_state(rows: Sequence[dict], png_path: str, *, title: str = "") -> str:
  """MQAR accuracy against state bytes per layer (log x), one series per config, one marker per
  (seq_len, kv) setting: Based (arXiv:2402.18668) Fig. 2 / Zoology's recall-memory trade-off."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  markers = "osD^v<>pPX*"
  settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
  for ci, config in enumerate(dict.fromkeys(r["config"] for r in rows)):
    color = f"C{ci % 10}"
    for si, s in enumerate(settings):
      pts = sorted((r["state_bytes_per_layer"], r["accuracy"]) for r in rows
                   if r["config"] == config and (r["seq_len"], r["num_kv_pairs"]) == s)
      if pts:
        ax.plot(*zip(*pts), marker=markers[si % len(markers)], color=color, linestyle="-",
                label=f"{config} L={s[0]} K={s[1]}")
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("state bytes per layer (batch 1, float32)")
  ax.set_ylabel("MQAR accuracy (best over LRs)")
  ax.set_title(title or "MQAR accuracy vs state size", fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, png_path)
