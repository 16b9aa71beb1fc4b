"""One table of held-out bits per byte for every architecture, trained on the Shakespeare bytes with
the same token budget.

  python -m memarch.evals.lm_table --tokens=2M                          # every row -> runs/lm_table
  python -m memarch.evals.lm_table --tokens=50K --rows=transformer,gated_deltanet --out=/tmp/lm
  python -m memarch.evals.lm_table --out=runs/lm_table --report_only    # table and plot only

Every row is one family config at `--size` (default tiny) with `task=text` (peer and ultramem:
`data=text`; configs_lib.text_task): byte tokens of the 34 training plays packed into rows of
`--seq_len` tokens (default 512), batch `--batch` (16). All rows share the step count
(steps = tokens // (batch * seq_len)), the learning rate (2e-3), warmup (a tenth of the steps, at
most 100), the cosine schedule, the seed and the held-out eval every tenth of the run; only the model
differs. Row settings that come from the family config (window, block, chunk, memory count) are
listed in the table's notes column. Rows whose family needs a different training setting would list
it there as well (`Row.overrides`); today none does.

Each row trains in its own workdir `<out>/<row>/` in a subprocess of this module (so one row cannot
break the next, and every row starts from the same cold process), then the same subprocess runs the
perplexity eval (memarch.evals.perplexity) on the held-out plays at the training length L and at 4L:
every held-out play is cut to its first `--max_tokens` / 4 tokens, and both lengths score exactly
those tokens, at 4L streamed through the model state in L-token segments. The results go to
`<out>/<row>/row.json`; the training log to `<out>/<row>/train.log`.

Resuming: a row with a row.json is read back, never retrained; an interrupted row resumes from its
newest checkpoint (the training loop does that by itself). A row started with other settings (token
budget, length, batch, ...) is refused with one line: use another --out or delete the row's folder.

Output: `<out>/lm_table.md` (architecture, parameters, bits per byte at L and 4L, training wall time,
steady-state steps per second, notes; a header with the command, date, device and token budget) and
`<out>/lm_table.png` (held-out bits per byte against training tokens, and bars at L and 4L). Both are
built from the row.json files alone (`--report_only` rebuilds them).

Timing: "train wall" is the whole `train_and_evaluate` call of the row (compilation, periodic evals
and checkpoints included); "steps/s" is measured between logged steps, leaving out compilation and
the intervals that hold an eval. Both depend on what else the machine runs; each row.json records
the load average when the row started.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Sequence

from memarch.evals.plots import save_figure

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ROW_FILE = "row.json"
SETTINGS_FILE = "settings.json"
LOG_FILE = "train.log"


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  config: str          # configs/<file>:<args>; '{window}' is filled in from the settings
  note: str = ""       # formatted with the row's first mixer's (or channel's) settings
  overrides: tuple = ()  # (dotted key, value) pairs a family needs beyond the shared settings


ROWS: dict[str, Row] = {
    "transformer": Row("Transformer++", "transformer.py:task=text"),
    "swa": Row("Sliding-window attention", "transformer.py:task=text,window={window}",
               "window {window}"),
    "gated_deltanet": Row("Gated DeltaNet", "gated_deltanet.py:task=text", "chunk {chunk_size}"),
    "mom": Row("MoM (gated delta)", "mom.py:task=text",
               "{num_memories} memories, top-{top_k}, shared memory {shared_memory}"),
    "titans_lmm": Row("Titans LMM", "titans.py:variant=lmm,task=text",
                      "memory depth {memory_depth}, chunk {chunk_size}"),
    "titans_mac": Row("Titans MAC", "titans.py:variant=mac,task=text",
                      "memory depth {memory_depth}, chunk {chunk_size}, segment {segment_len}"),
    "titans_mag": Row("Titans MAG", "titans.py:variant=mag,task=text",
                      "memory depth {memory_depth}, chunk {chunk_size}, window {window}"),
    "titans_mal": Row("Titans MAL", "titans.py:variant=mal,task=text",
                      "memory depth {memory_depth}, chunk {chunk_size}, window {window}"),
    "moneta": Row("Moneta", "miras.py:variant=moneta,task=text",
                  "memory depth {memory_depth}, chunk {chunk_size}"),
    "yaad": Row("Yaad", "miras.py:variant=yaad,task=text",
                "memory depth {memory_depth}, chunk {chunk_size}"),
    "memora": Row("Memora", "miras.py:variant=memora,task=text",
                  "memory depth {memory_depth}, chunk {chunk_size}"),
    "landmark": Row("Landmark attention", "landmark.py:task=text",
                    "block {block_size}, top-{top_k}, {recent_blocks} recent block(s)"),
    "hcam": Row("HCAM", "hcam.py:task=text",
                "chunk {chunk_size}, segment {segment_len}, top-{top_k} of <= {max_chunks} chunks"),
    "peer": Row("Transformer++ with PEER", "peer.py:data=text",
                "PEER FFN in the middle block: {num_subkeys}^2 experts, {num_heads} heads, "
                "top-{top_k}"),
    "ultramem": Row("Transformer++ with UltraMemV2", "ultramem.py:data=text",
                    "UltraMemV2 beside every FFN: {num_subkeys}^2 rows, top-{top_m}"),
}


class TableError(ValueError):
  """A request the table cannot serve (the message says what to change)."""


# ---------------------------------------------------------------------------------------------
# Settings and configs
# ---------------------------------------------------------------------------------------------

def parse_tokens(text: str | int) -> int:
  """'2M' -> 2_000_000, '50K' -> 50_000, '1.5e6' or '300000' as written."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgGbB]?)\s*", str(text))
  if not m:
    raise TableError(f"--tokens={text!r} is not a token count (e.g. 2M, 500K, 100000)")
  scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}[m.group(2).lower()]
  value = int(round(float(m.group(1)) * scale))
  if value < 1:
    raise TableError(f"--tokens={text!r} must be at least 1 token")
  return value


def parse_rows(text: str | Sequence[str] | None) -> list[str]:
  """'transformer,gdn' -> names in the order given; unknown names fail with one line."""
  if text is None or text == "" or text == "all":
    return list(ROWS)
  names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
  names = [n for n in names if n]
  for n in names:
    if n not in ROWS:
      near = difflib.get_close_matches(n, ROWS, n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise TableError(f"unknown row {n!r}{hint}; choose from {', '.join(ROWS)}")
  if len(set(names)) != len(names):
    raise TableError(f"--rows names a row twice: {','.join(names)}")
  return names


def make_settings(tokens: int, *, seq_len: int = 512, batch_size: int = 16, size: str = "tiny",
                  lr: float = 2e-3, max_tokens: int = 65536, eval_rows: int = 32,
                  seed: int = 0) -> dict:
  """The training and eval settings every row shares (stored in each row's settings.json)."""
  if seq_len < 2 or batch_size < 1:
    raise TableError(f"--seq_len must be >= 2 and --batch >= 1, got {seq_len} and {batch_size}")
  steps = max(1, tokens // (batch_size * seq_len))
  return dict(size=size, seq_len=seq_len, batch_size=batch_size, tokens_requested=tokens,
              steps=steps, tokens=steps * batch_size * seq_len, lr=lr,
              warmup_steps=max(1, min(100, steps // 10)), schedule="cosine",
              eval_every=max(2, steps // 10), log_every=max(1, min(25, steps // 40)),
              ckpt_every=2 * max(2, steps // 10), eval_rows=eval_rows, max_tokens=max_tokens,
              eval_lengths=[seq_len, 4 * seq_len], seed=seed)


def _config_spec(name: str, settings: dict) -> str:
  file, _, arg = ROWS[name].config.partition(":")
  arg = arg.format(window=max(1, settings["seq_len"] // 4))
  return f"{file}:{arg},size={settings['size']}"


def row_config(name: str, settings: dict):
  """The locked ConfigDict row `name` trains with."""
  from memarch import configs_lib
  spec = _config_spec(name, settings)
  c = configs_lib.load_config(os.path.join(ROOT, "configs", spec))
  c.unlock()
  s = settings
  c.seed = s["seed"]
  c.data.seq_len, c.data.batch_size, c.data.eval_rows = s["seq_len"], s["batch_size"], s["eval_rows"]
  c.opt.lr, c.opt.warmup_steps, c.opt.schedule = s["lr"], s["warmup_steps"], s["schedule"]
  c.train.num_steps = s["steps"]
  c.train.eval_every, c.train.log_every, c.train.ckpt_every = (s["eval_every"], s["log_every"],
                                                               s["ckpt_every"])
  c.train.stats_every = 0  # no statistics steps: they would slow some rows' timing only
  c.train.stop_at_accuracy = 0.0
  c.train.time_budget_s = 0.0
  c.train.progress = False
  c.evals.segment_len = s["seq_len"]
  for key, value in ROWS[name].overrides:
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


def row_note(name: str, cfg) -> str:
  """The row's notes: its family settings, and any training setting it does not share."""
  from memarch import configs_lib
  m = configs_lib.to_dict(cfg.model)
  fields = {}
  for section, pattern in (("channel", m["channel_pattern"]), ("mixer", m["layer_pattern"])):
    for kind in pattern:
      fields.update({k: v for k, v in m[section].get(kind, {}).items() if k not in fields})
  parts = [ROWS[name].note.format(**fields)] if ROWS[name].note else []
  parts += [f"{k}={v} (family setting)" for k, v in ROWS[name].overrides]
  return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# One row (run in a subprocess: `python -m memarch.evals.lm_table --worker=<row dir>`)
# ---------------------------------------------------------------------------------------------

def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


def steady_steps_per_sec(metrics: Sequence[dict]) -> float:
  """Steps per second between logged training steps of the last attempt, leaving out compilation
  (before the first logged step) and every interval that holds an eval (checkpoints are saved at
  eval steps only: ckpt_every is a multiple of eval_every). NaN if none is left."""
  train = [(int(r["step"]), float(r["train/elapsed_sec"])) for r in metrics
           if "train/elapsed_sec" in r]
  evals = {int(r["step"]) for r in metrics if "eval/loss" in r or "eval/bits_per_byte" in r}
  # A resumed run restarts its clock: keep the last attempt (elapsed time increasing to the end).
  start = len(train) - 1
  while start > 0 and train[start - 1][1] < train[start][1] and train[start - 1][0] < train[start][0]:
    start -= 1
  steps = secs = 0.0
  for (s0, e0), (s1, e1) in zip(train[start:], train[start + 1:]):
    if any(s0 < e <= s1 for e in evals):  # an eval at step e runs before step e's row is logged
      continue
    steps, secs = steps + (s1 - s0), secs + (e1 - e0)
  return steps / secs if secs > 0 else float("nan")


def run_row(row_dir: str) -> dict:
  """Trains and evaluates the row whose settings.json is in `row_dir`; writes row.json."""
  import jax

  from memarch.evals.runner import run_evals
  from memarch.metrics import read_metrics
  from memarch.train import train_and_evaluate
  with open(os.path.join(row_dir, SETTINGS_FILE)) as f:
    meta = json.load(f)
  name, s = meta["row"], meta["settings"]
  cfg = row_config(name, s)
  ckpt_dir = os.path.join(row_dir, "checkpoints")
  resumed = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  t0 = time.time()
  final = train_and_evaluate(cfg, row_dir)
  train_sec = time.time() - t0
  t1 = time.time()
  res = run_evals(row_dir, "perplexity", lengths=s["eval_lengths"], max_tokens=s["max_tokens"],
                  batch_size=8)
  eval_sec = time.time() - t1
  ppl = {int(r["length"]): r for r in res["perplexity"]["result"]}
  metrics = read_metrics(os.path.join(row_dir, "metrics.jsonl"))
  dev = jax.devices()[0]
  device = (f"{_cpu_name()} ({os.cpu_count()} cores)" if dev.platform == "cpu"
            else f"{dev.device_kind} ({dev.platform})")
  row = {
      "row": name, "label": ROWS[name].label, "config": "configs/" + _config_spec(name, s),
      "note": row_note(name, cfg), "settings": s, "num_params": int(final["num_params"]),
      "steps": int(final["step"]),
      "bits_per_byte": {str(l): float(ppl[l]["bits_per_byte"]) for l in s["eval_lengths"]},
      "loss": {str(l): float(ppl[l]["loss"]) for l in s["eval_lengths"]},
      "streamed": {str(l): bool(ppl[l].get("streamed", True)) for l in s["eval_lengths"]},
      "scored_tokens": int(ppl[s["eval_lengths"][0]]["tokens"]),
      "train_eval_bits_per_byte": float(final.get("eval/bits_per_byte", float("nan"))),
      "final_train_loss": float(final.get("train/loss", float("nan"))),
      "train_wall_sec": train_sec, "eval_wall_sec": eval_sec,
      "steps_per_sec": steady_steps_per_sec(metrics),
      "resumed": resumed, "load_average_at_start": load,
      "curve": [[int(r["step"]), float(r["eval/bits_per_byte"])] for r in metrics
                if "eval/bits_per_byte" in r],
      "device": device, "jax": jax.__version__,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": meta.get("command", ""),
  }
  tmp = os.path.join(row_dir, ROW_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(row, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(row_dir, ROW_FILE))
  return row


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def read_rows(out_dir: str, names: Sequence[str] | None = None) -> list[dict]:
  """The finished rows in `out_dir` (all, or `names`), in table order."""
  order = list(names) if names else list(ROWS)
  extra = sorted(n for n in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                 if n not in order and not names)
  rows = []
  for n in order + extra:
    path = os.path.join(out_dir, n, ROW_FILE)
    if os.path.exists(path):
      with open(path) as f:
        rows.append(json.load(f))
  return rows


def _fmt(x: float, spec: str) -> str:
  return "n/a" if x is None or not math.isfinite(float(x)) else format(float(x), spec)


def markdown(rows: Sequence[dict], *, command: str = "", missing: Sequence[str] = ()) -> str:
  """The table (module docstring) of finished rows; `missing` rows are listed under it."""
  if not rows:
    raise TableError("no finished rows to tabulate")
  s0 = rows[0]["settings"]
  L, L4 = s0["eval_lengths"]
  same = all(r["settings"] == s0 for r in rows)
  devices = sorted({r["device"] for r in rows})
  loads = [r["load_average_at_start"] for r in rows if math.isfinite(r["load_average_at_start"])]
  dates = sorted(r["date"] for r in rows)
  date = dates[0][:10] if dates[0][:10] == dates[-1][:10] else f"{dates[0][:10]} to {dates[-1][:10]}"
  budget = (f"{s0['tokens_requested']:,} tokens requested: {s0['steps']:,} steps x batch "
            f"{s0['batch_size']} x {s0['seq_len']} tokens = {s0['tokens']:,} training tokens per row"
            if same else "rows differ in their settings (see each row.json)")
  # The commands that trained the rows; a --report_only rebuild names itself after them.
  trained_by = list(dict.fromkeys(r.get("command") or "" for r in rows)) or [""]
  shown = [c or "python -m memarch.evals.lm_table" for c in trained_by]
  if command and command not in trained_by:
    shown.append(f"table rebuilt with {command}")
  lines = [
      f"# Held-out bits per byte on Shakespeare, size={s0['size']}, byte tokens", "",
      f"{'; '.join(f'`{c}`' for c in shown)} | {date} | device: "
      f"{'; '.join(devices)} | budget: {budget}", "",
      f"Shared by every row{'' if same else ' (the first row)'}: lr {s0['lr']:g}, "
      f"{s0['schedule']} schedule, warmup steps {s0['warmup_steps']}, seed {s0['seed']}, "
      f"held-out eval every {s0['eval_every']} steps. bits/byte at L = {L} and 4L = {L4}: the same "
      f"{rows[0]['scored_tokens']:,} tokens of the 4 held-out plays (the first "
      f"{s0['max_tokens'] // 4:,} of each), at {L4} streamed through the model state in "
      f"{L}-token segments. Load average (1 min) when the rows started: "
      + (f"{min(loads):.1f} to {max(loads):.1f}." if loads else "n/a."), "",
      f"| architecture | parameters | bits/byte @{L} | bits/byte @{L4} | train wall (s) | steps/s "
      f"| notes |",
      "|---|---:|---:|---:|---:|---:|---|"]
  footnotes = set()
  if s0["max_tokens"] and s0["max_tokens"] // 4 < L4:
    footnotes.add(f"Note: each held-out play was cut to {s0['max_tokens'] // 4:,} tokens, fewer "
                  f"than 4L = {L4}, so no token sees {L4} tokens of context (raise --max_tokens).")
  for r in rows:
    cells = []
    for key in (str(r["settings"]["eval_lengths"][0]), str(r["settings"]["eval_lengths"][1])):
      mark = ""
      if not r["streamed"][key]:
        mark = "*"
        footnotes.add("* not streamed: this model cannot carry its state, so it was scored in "
                      "single calls of the training length.")
      cells.append(_fmt(r["bits_per_byte"][key], ".4f") + mark)
    wall = _fmt(r["train_wall_sec"], ".1f")
    if r.get("resumed"):
      wall += " (resumed)"
      footnotes.add("(resumed): the run was interrupted and resumed from a checkpoint; its wall "
                    "time covers the last attempt only.")
    note = r.get("note", "")
    if not same and r["settings"] != s0:
      note = "; ".join(filter(None, [note, f"{r['settings']['steps']} steps, seq_len "
                                           f"{r['settings']['seq_len']}, batch "
                                           f"{r['settings']['batch_size']}"]))
    lines.append(f"| {r['label']} (`{r['row']}`) | {r['num_params']:,} | {cells[0]} | {cells[1]} | "
                 f"{wall} | {_fmt(r['steps_per_sec'], '.2f')} | {note} |")
  lines += ["", "train wall: the whole training call (compilation, periodic evals and checkpoints "
            "included). steps/s: between logged steps, without compilation and eval intervals."]
  lines += sorted(footnotes)
  if missing:
    lines += ["", "Not finished (no row.json): " + ", ".join(missing) + "."]
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], png_path: str) -> str:
  """Held-out bits per byte against training tokens (every row), and bars at L and 4L."""
  from memarch.evals.plots import _plt
  plt = _plt()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.9 + max(4.2, 0.32 * len(rows))),
                                 gridspec_kw=dict(width_ratios=[1.2, 1]))
  for i, r in enumerate(rows):
    if r["curve"]:
      per_step = r["settings"]["batch_size"] * r["settings"]["seq_len"]
      xs, ys = zip(*[(s * per_step, b) for s, b in r["curve"]])
      ax1.plot(xs, ys, marker=".", ms=4, lw=1.2, color=f"C{i % 10}",
               ls="-" if i < 10 else "--", label=r["label"])
  ax1.set(xlabel="training tokens", ylabel="held-out bits per byte",
          title="held-out bits per byte during training")
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=7, ncol=2)
  ys = range(len(rows))
  for j, (off, alpha) in enumerate(((-0.2, 1.0), (0.2, 0.55))):
    vals = [r["bits_per_byte"][str(r["settings"]["eval_lengths"][j])] for r in rows]
    L = rows[0]["settings"]["eval_lengths"][j]
    ax2.barh([y + off for y in ys], vals, height=0.4, alpha=alpha, color="tab:blue",
             label=f"context {L}")
    for y, v in zip(ys, vals):
      ax2.text(v, y + off, f" {v:.3f}", va="center", fontsize=6)
  ax2.set_yticks(list(ys), [r["label"] for r in rows], fontsize=7)
  ax2.invert_yaxis()
  finite = [v for r in rows for v in r["bits_per_byte"].values() if math.isfinite(v)]
  if finite:
    lo, hi = min(finite), max(finite)
    ax2.set_xlim(max(0.0, lo - 0.15 * (hi - lo + 0.1)), hi + 0.25 * (hi - lo + 0.1))
  ax2.set(xlabel="held-out bits per byte (lower is better)", title="after training")
  ax2.grid(axis="x", alpha=0.3)
  ax2.legend(fontsize=7)
  return save_figure(fig, png_path, dpi=110)


def write_report(out_dir: str, names: Sequence[str] | None = None, *, command: str = "",
                 only: bool = False) -> dict:
  """Writes lm_table.md and lm_table.png from the row.json files in `out_dir`: every finished row
  there (`only`: just `names`); rows of `names` without a row.json are listed as not finished."""
  rows = read_rows(out_dir, names if only else None)
  if not rows:
    raise TableError(f"no finished rows (<row>/{ROW_FILE}) in {out_dir}")
  done = {r["row"] for r in rows}
  missing = [n for n in (names or []) if n not in done]
  paths = {"md": os.path.join(out_dir, "lm_table.md"), "png": os.path.join(out_dir, "lm_table.png")}
  with open(paths["md"], "w") as f:
    f.write(markdown(rows, command=command, missing=missing))
  plot(rows, paths["png"])
  return {"paths": paths, "rows": rows, "missing": missing}


def _failure_line(log_path: str) -> str:
  try:
    with open(log_path, errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return "no log"
  for l in reversed(lines):
    if l.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", l):
      return l
  return lines[-1] if lines else "no output"


def run_table(tokens: int | str, out_dir: str, rows: str | Sequence[str] | None = None, *,
              command: str = "", log: Callable[[str], None] | None = None,
              progress: bool = True, **settings_kw) -> dict:
  """Trains and evaluates every row not finished yet (a subprocess each), then writes the table
  and the plot. Returns write_report's dict plus 'failed' (row -> one-line reason) and 'trained'."""
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  names = parse_rows(rows)
  settings = make_settings(parse_tokens(tokens), **settings_kw)
  for n in names:
    row_config(n, settings)  # a config that cannot be built fails before any training
  os.makedirs(out_dir, exist_ok=True)
  for n in names:  # a row started with other settings fails before any training
    path = os.path.join(out_dir, n, SETTINGS_FILE)
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)["settings"]
      diff = [k for k in [*settings, *old] if old.get(k) != settings.get(k)]
      if diff:
        k = diff[0]
        raise TableError(f"row {n} in {out_dir} was started with {k}={old.get(k)!r}, not "
                         f"{settings.get(k)!r}; use another --out or delete "
                         f"{os.path.join(out_dir, n)}")
  failed, trained = {}, []
  from tqdm.auto import tqdm
  bar = tqdm(names, desc="lm_table", unit="row", disable=not progress, file=sys.stderr,
             dynamic_ncols=True)
  say = (lambda m: bar.write(m, file=sys.stderr)) if progress else log
  for n in bar:
    bar.set_postfix(row=n)
    row_dir = os.path.join(out_dir, n)
    row_path = os.path.join(row_dir, ROW_FILE)
    kept = os.path.exists(row_path)
    if not kept:
      os.makedirs(row_dir, exist_ok=True)
      with open(os.path.join(row_dir, SETTINGS_FILE), "w") as f:
        json.dump({"row": n, "settings": settings, "command": command}, f, indent=2, sort_keys=True)
      log_path = os.path.join(row_dir, LOG_FILE)
      with open(log_path, "a") as logf:
        logf.write(f"==== {datetime.datetime.now().isoformat(timespec='seconds')} {command}\n")
        logf.flush()
        rc = subprocess.run([sys.executable, "-m", "memarch.evals.lm_table",
                             f"--worker={os.path.abspath(row_dir)}"],
                            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT).returncode
      if rc != 0 or not os.path.exists(row_path):
        failed[n] = _failure_line(log_path)
        say(f"lm_table {n}: FAILED ({failed[n]}); log: {log_path}")
        continue
      trained.append(n)
    with open(row_path) as f:
      r = json.load(f)
    L, L4 = (str(x) for x in r["settings"]["eval_lengths"])
    say(f"lm_table {n}: {r['num_params']:,} params, bits/byte {r['bits_per_byte'][L]:.4f} @{L}, "
        f"{r['bits_per_byte'][L4]:.4f} @{L4}; {r['steps']} steps, train {r['train_wall_sec']:.1f}s "
        f"({r['steps_per_sec']:.2f} steps/s), eval {r['eval_wall_sec']:.1f}s"
        + (" (kept from an earlier run)" if kept else ""))
  bar.close()
  out = {"failed": failed, "trained": trained, "paths": {}, "rows": [], "missing": list(failed)}
  if len(failed) < len(names):
    out.update(write_report(out_dir, names, command=command))
    log(f"memarch: LM table {out['paths']['md']}, plot {out['paths']['png']}")
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog="python -m memarch.evals.lm_table", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", default="2M", help="training tokens per row (e.g. 2M, 500K)")
  p.add_argument("--out", default="runs/lm_table", help="output folder (one workdir per row)")
  p.add_argument("--rows", default="all", help=f"comma-separated, from: {','.join(ROWS)}")
  p.add_argument("--seq_len", type=int, default=512, help="training row length L")
  p.add_argument("--batch", type=int, default=16, help="rows per step")
  p.add_argument("--size", default="tiny", help="size preset of every row")
  p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every row")
  p.add_argument("--max_tokens", type=int, default=65536,
                 help="held-out tokens scored at L and 4L (spread over the 4 plays; 0 = all)")
  p.add_argument("--eval_rows", type=int, default=32, help="held-out rows scored during training")
  p.add_argument("--report_only", action="store_true", help="rewrite the table and plot only")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    run_row(a.worker)
    return 0
  command = " ".join(["python -m memarch.evals.lm_table", *argv])
  try:
    if a.report_only:
      names = parse_rows(a.rows) if a.rows not in ("", "all") else None
      out = write_report(a.out, names, command=command, only=bool(names))
      print(f"memarch: LM table {out['paths']['md']}, plot {out['paths']['png']}", file=sys.stderr)
      return 0
    out = run_table(a.tokens, a.out, a.rows, command=command, progress=not a.no_progress,
                    seq_len=a.seq_len, batch_size=a.batch, size=a.size, lr=a.lr,
                    max_tokens=a.max_tokens, eval_rows=a.eval_rows)
  except (TableError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if out["failed"]:
    print(f"error: {len(out['failed'])} row(s) failed: {', '.join(out['failed'])} (see their "
          f"{LOG_FILE})", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
