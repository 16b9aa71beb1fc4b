"""One results file per workdir, and one comparison report across workdirs.

Every eval of `scripts/eval.py` appends its numbers to `<workdir>/eval/results.jsonl`, one JSON row
per number: {"eval", "setting", "metric", "value", "step", "date", "arch"} plus the structured parts
of the setting ("task", "length", "depth", "source") that plots need. The file only grows, so it
keeps the history of a run (every checkpoint evaluated, every rerun); the newest row of each
(eval, setting, metric) is the current value.

  python -m memarch.evals.report runs/gdn runs/titans --out=report/

prints a markdown table (one row per eval, setting and metric; one column per workdir) and writes it
to `<out>/report.md` with the standard plots: a BABILong heatmap (task x length) per workdir,
accuracy against context length (BABILong mean, passkey and NIAH averaged over depths) and bits per
byte against context length, one line per workdir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from typing import Sequence

from memarch.evals.plots import save_figure

RESULTS = "results.jsonl"
EVAL_ORDER = ("perplexity", "harness", "babilong", "passkey", "niah", "mqar")


class ReportError(RuntimeError):
  """A report cannot be made for a reason the user must fix (the message says how)."""


def _row(name, setting, metric, value, **parts) -> dict:
  return dict(eval=name, setting=setting, metric=metric, value=float(value),
              **{k: v for k, v in parts.items() if v is not None})


def _tokens(length) -> int:
  """A length as a number: 1024 -> 1024, the published BABILong split names 4k -> 4000."""
  text = str(length)
  return int(float(text[:-1]) * 1000) if text[-1:] in "kK" else int(text)


def rows_of(name: str, res) -> list[dict]:
  """The numbers of one eval's result (as run_evals writes it) as result rows (without step/date)."""
  out = []
  if name == "babilong":
    for t in res["tasks"]:
      for l in res["lengths"]:
        out.append(_row(name, f"{t} @ {l}", "accuracy", res["accuracy"][t][str(l)], task=t,
                        length=_tokens(l)))
    out += [_row(name, f"mean @ {l}", "accuracy", res["mean"][str(l)], task="mean",
                 length=_tokens(l)) for l in res["lengths"]]
  elif name in ("passkey", "niah"):
    for d in res["depths"]:
      for l in res["lengths"]:
        out.append(_row(name, f"depth {d:g} @ {l}", "accuracy", res["accuracy"][str(d)][str(l)],
                        depth=float(d), length=int(l)))
        if "score" in res:
          out.append(_row(name, f"depth {d:g} @ {l}", "string_match_all",
                          res["score"][str(d)][str(l)], depth=float(d), length=int(l)))
  elif name == "mqar":
    out += [_row(name, f"L={r['seq_len']} K={r['num_kv_pairs']}", "accuracy", r["accuracy"],
                 length=int(r["seq_len"])) for r in res["rows"]]
  elif name == "perplexity":  # a list of rows, one per source and length
    for r in res:
      for metric in ("bits_per_byte", "loss"):
        out.append(_row(name, f"{r['source']} @ {r['length']}", metric, r[metric],
                        source=r["source"], length=int(r["length"])))
  elif name == "harness":
    out += [_row(name, r["task"], r["metric"], r["value"], task=r["task"]) for r in res["rows"]]
  else:
    raise ValueError(f"no result rows for eval {name!r}")
  return out


def append(workdir: str, rows: Sequence[dict], *, step: int, arch: str) -> str:
  """Appends `rows` with step, date (UTC, ISO 8601) and arch to <workdir>/eval/results.jsonl."""
  path = os.path.join(workdir, "eval", RESULTS)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  with open(path, "a") as f:
    for r in rows:
      f.write(json.dumps(dict(r, step=int(step), date=date, arch=arch), sort_keys=True) + "\n")
  return path


def load(workdir: str) -> list[dict]:
  """Every row of <workdir>/eval/results.jsonl (unreadable lines skipped)."""
  path = os.path.join(workdir, "eval", RESULTS)
  if not os.path.exists(path):
    raise ReportError(f"{workdir} has no eval/{RESULTS}: run scripts/eval.py --workdir={workdir} "
                      "first")
  rows = []
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:
        continue
      if isinstance(r, dict) and {"eval", "setting", "metric", "value"} <= set(r):
        rows.append(r)
  return rows


def latest(rows: Sequence[dict]) -> dict[tuple, dict]:
  """The newest row of each (eval, setting, metric): the last one appended."""
  return {(r["eval"], r["setting"], r["metric"]): r for r in rows}


def _sort_key(key: tuple, row: dict):
  name, setting, metric = key
  order = EVAL_ORDER.index(name) if name in EVAL_ORDER else len(EVAL_ORDER)
  return (order, name, str(row.get("source", "")), str(row.get("task", "")),
          float(row.get("depth", -1)), int(row.get("length", -1)), setting, metric)


def _fmt(x: float) -> str:
  return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def label(workdir: str, rows: Sequence[dict]) -> str:
  """A workdir's column name: its folder name, and its architecture when the rows name it."""
  arch = next((r["arch"] for r in reversed(rows) if r.get("arch")), "")
  name = os.path.basename(os.path.normpath(workdir))
  return f"{name} ({arch})" if arch and arch != name else name


def table(workdirs: Sequence[str]) -> tuple[str, dict[str, dict]]:
  """(markdown comparison table, {label: latest rows}) of the workdirs' newest results."""
  per = {}
  for w in workdirs:
    rows = load(w)
    lab = label(w, rows)
    while lab in per:  # two folders of the same name
      lab += "'"
    per[lab] = latest(rows)
  keys = {}
  for rows in per.values():
    for k, r in rows.items():
      keys.setdefault(k, r)
  labels = list(per)
  steps = {lab: sorted({r.get("step") for r in rows.values() if r.get("step") is not None})
           for lab, rows in per.items()}
  lines = ["| eval | setting | metric | " + " | ".join(labels) + " |",
           "|---|---|---|" + "---:|" * len(labels)]
  for k in sorted(keys, key=lambda k: _sort_key(k, keys[k])):
    cells = []
    for lab in labels:
      r = per[lab].get(k)
      # A cell names its checkpoint step when the workdir's newest values come from several.
      step = f" (step {r['step']})" if r is not None and len(steps[lab]) > 1 else ""
      cells.append("" if r is None else _fmt(r["value"]) + step)
    lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
  head = "\n".join(f"- {lab}: step {', '.join(map(str, s))}" for lab, s in steps.items())
  return head + "\n\n" + "\n".join(lines) + "\n", per


def _lines_plot(series: dict[str, list[tuple[int, float]]], png: str, *, ylabel: str,
                title: str) -> str:
  from memarch.evals.plots import _plt
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, (name, pts) in enumerate(series.items()):
    pts = [(x, y) for x, y in pts if x > 0]  # a log axis: the 0k split has no place on it
    if not pts:
      continue
    xs, ys = zip(*sorted(pts))
    ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name)
  ax.set_xscale("log", base=2)
  ticks = sorted({x for pts in series.values() for x, _ in pts if x > 0})
  ax.set_xticks(ticks, [f"{t:,}" for t in ticks], fontsize=7)
  ax.minorticks_off()
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, png)


def _mean_by_length(rows, name: str, metric: str) -> list[tuple[int, float]]:
  by = {}
  for r in rows:
    if r["eval"] == name and r["metric"] == metric and "length" in r and r.get("task") != "mean":
      by.setdefault(int(r["length"]), []).append(r["value"])
  return [(l, sum(v) / len(v)) for l, v in sorted(by.items())]


def plots(per: dict[str, dict], out_dir: str) -> list[str]:
  """The standard plots of the latest rows per workdir label (only those with data)."""
  from memarch.evals.plots import heatmap
  paths = []
  acc, bpb = {}, {}
  for lab, rows in per.items():
    rows = list(rows.values())
    cells = {(r["task"], int(r["length"])): r["value"] for r in rows
             if r["eval"] == "babilong" and r["metric"] == "accuracy"}
    if cells:
      tasks = sorted({t for t, _ in cells} - {"mean"}) + (["mean"] if any(
          t == "mean" for t, _ in cells) else [])
      lengths = sorted({l for _, l in cells})
      grid = [[cells.get((t, l), float("nan")) for l in lengths] for t in tasks]
      safe = re.sub(r"[^A-Za-z0-9.-]+", "_", lab).strip("_")
      paths.append(heatmap(grid, tasks, lengths, os.path.join(out_dir, f"babilong_{safe}.png"),
                           xlabel="context length (tokens)", ylabel="task",
                           title=f"BABILong accuracy, {lab}"))
    for name in ("babilong", "passkey", "niah"):
      pts = _mean_by_length(rows, name, "accuracy")
      if pts:
        acc[f"{lab}: {name}"] = pts
    for src in sorted({r.get("source", "") for r in rows if r["eval"] == "perplexity"}):
      pts = [(int(r["length"]), r["value"]) for r in rows if r["eval"] == "perplexity"
             and r["metric"] == "bits_per_byte" and r.get("source", "") == src]
      if pts:
        bpb[f"{lab}: {src}"] = pts
  if acc:
    paths.append(_lines_plot(acc, os.path.join(out_dir, "accuracy_vs_length.png"),
                             ylabel="accuracy (mean over tasks / depths)",
                             title="accuracy vs context length"))
  if bpb:
    paths.append(_lines_plot(bpb, os.path.join(out_dir, "bits_per_byte_vs_length.png"),
                             ylabel="bits per byte", title="held-out bits per byte vs context length"))
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m memarch.evals.report",
                              description="Compare the eval results of training workdirs.")
  p.add_argument("workdirs", nargs="+", help="training workdirs with eval/results.jsonl")
  p.add_argument("--out", default="eval_report", help="folder for report.md and the plots")
  args = p.parse_args(argv)
  try:
    md, per = table(args.workdirs)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(md)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write("# Evaluation report\n\n" + md)
  for path in [os.path.join(args.out, "report.md")] + plots(per, args.out):
    print(f"wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
