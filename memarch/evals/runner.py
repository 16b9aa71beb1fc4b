"""Evaluate a trained workdir: restore its checkpoint, run the named evals, write JSON and PNG files.

`run_evals(workdir, names)` is what `scripts/eval.py` calls. Outputs go to `<workdir>/eval/`:

  babilong.json, babilong.png   accuracy per task x length (+ qa1-qa5 mean), restricted argmax
  passkey.json, passkey.png     teacher-forced exact match per depth x length
  niah.json, niah.png           exact match and greedy string_match_all per depth x length
  mqar.json, mqar.md, mqar.png  MQAR test accuracy per (seq_len, kv) setting
  perplexity.json, .png         bits per byte, loss and tokens per context length on the held-out
                                split or local files (a list; later runs merge into it)
  harness.json, harness.md      lm-evaluation-harness scores of `tasks` (memarch.evals.harness)
  results.jsonl                 every number of every run appended, one row each (eval, setting,
                                metric, value, step, date; memarch.evals.report compares workdirs)

Defaults for lengths, depths, tasks, example counts and the segment length come from the config's
`evals` section when it has them (configs/babilong.py sets them), else from `DEFAULTS`; arguments
override both. Long inputs run segment by segment through the recurrent state
(`memarch.evals.long_context`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

EVALS = ("babilong", "passkey", "niah", "mqar", "perplexity", "harness")
TEXT_EVALS = ("babilong", "passkey", "niah")
DEFAULTS = dict(names=("mqar",), lengths=(512, 1024, 2048), num_examples=20, segment_len=512, batch_size=8,
                depths=(0.0, 0.25, 0.5, 0.75, 1.0), tasks=("qa1", "qa2", "qa3", "qa4", "qa5"),
                mqar_settings=(), mqar_examples=1000)


class EvalError(RuntimeError):
  """An evaluation cannot run for a reason the user must fix (the message says how)."""


def parse_names(names: str | Sequence[str] | None) -> list[str]:
  if names is None:
    return []
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  bad = [n for n in names if n not in EVALS]
  if bad:
    raise EvalError(f"unknown eval {bad[0]!r}; choose from {', '.join(EVALS)}")
  return list(names)


def parse_settings(text: str | Sequence) -> list[tuple[int, int]]:
  """'64:4,128:8' -> [(64, 4), (128, 8)] (MQAR seq_len:num_kv_pairs)."""
  if not isinstance(text, str):
    return [(int(a), int(b)) for a, b in text]
  out = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    try:
      l, k = part.split(":")
      out.append((int(l), int(k)))
    except ValueError:
      raise EvalError(f"MQAR setting {part!r} is not seq_len:kv (e.g. 64:4)") from None
  return out


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def load_workdir(workdir: str):
  """(config, data source, model, step) from the newest checkpoint, with one-line errors."""
  if not os.path.isdir(workdir):
    raise EvalError(f"workdir {workdir} does not exist; train first (scripts/train.py "
                    f"--workdir={workdir}) or pass --train_first --config=...")
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise EvalError(f"{workdir} has no config.json: not a memarch training workdir")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise EvalError(f"no checkpoint in {workdir}/checkpoints; train first with scripts/train.py "
                    f"--workdir={workdir} (or pass --train_first --config=...)")
  from memarch.sampling import load_trained
  try:
    cfg, data, model = load_trained(workdir)
  except FileNotFoundError as e:
    raise EvalError(str(e)) from None
  return cfg, data, model, steps[-1]


def make_runner(model, data, segment_len: int):
  """The StreamingRunner every eval uses; models trained on rows in landmark attention's layout are
  fed prompts in that layout too."""
  from memarch.evals import long_context
  return long_context.StreamingRunner(model, segment_len=segment_len,
                                      landmark_block=getattr(data, "landmark_block", 0),
                                      landmark_id=getattr(data, "landmark_id", None))


def workdir_tokenizer(cfg, data):
  """The tokenizer the workdir's model was trained with."""
  from memarch.data.tokenizer import get_tokenizer
  return getattr(data, "tokenizer", None) or get_tokenizer(cfg.data.tokenizer,
                                                           cfg.data.spm_model or None)


def _evals_default(cfg, key):
  ev = cfg.get("evals", None)
  if ev is not None and key in ev and ev[key] not in (None, (), []):
    v = ev[key]
    return tuple(v) if isinstance(v, (list, tuple)) else v
  return DEFAULTS[key]


def _write_json(path: str, obj) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  return path


def evaluate_mqar(runner, data, settings: Sequence[tuple[int, int]], *, num_examples: int,
                  batch_size: int) -> dict:
  """MQAR test-split accuracy (Zoology's metric) per (seq_len, kv) setting, run through
  the state in `runner.segment_len`-token segments."""
  from memarch.data import mqar
  rows = []
  for seq_len, kv in settings:
    try:
      ev = data.eval_set(num_examples, seq_len=seq_len, num_kv_pairs=kv)
    except ValueError as e:
      raise EvalError(f"MQAR setting {seq_len}:{kv}: {e}") from None
    preds = []
    for i in range(0, num_examples, batch_size):
      x = ev["inputs"][i:i + batch_size]
      n = len(x)
      if n < batch_size:  # one compiled shape per setting
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)])
      logits, _ = runner.run_segments(x, max_len=seq_len)
      preds.append(np.asarray(logits.argmax(-1))[:n])
    rows.append({"seq_len": seq_len, "num_kv_pairs": kv,
                 "accuracy": mqar.accuracy(np.concatenate(preds), ev["targets"])})
  return {"name": "MQAR (Zoology protocol, memarch generator)", "metric": "mean per-example query "
          "accuracy, argmax over the full vocabulary", "rows": rows, "num_examples": num_examples,
          "vocab_size": int(data.vocab_size), "segment_len": runner.segment_len}


def mqar_markdown(result: dict, title: str = "") -> str:
  lines = [f"# {title or result['name']}", "", "| seq_len | kv pairs | accuracy |", "|---|---|---|"]
  lines += [f"| {r['seq_len']} | {r['num_kv_pairs']} | {r['accuracy']:.4f} |" for r in result["rows"]]
  return "\n".join(lines) + "\n"


def run_evals(workdir: str, names: str | Sequence[str] | None = None, *,
              lengths: Sequence[int] | None = None, num_examples: int | None = None,
              segment_len: int | None = None, batch_size: int | None = None,
              depths: Sequence[float] | None = None, tasks: Sequence[str] | None = None,
              mqar_settings: str | Sequence | None = None, seed: int = 0,
              text_paths: Sequence[str] | None = None, max_tokens: int | None = None,
              limit: float | None = None, include_path: Sequence[str] | None = None,
              num_fewshot: int | None = None, babilong_path: str | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, dict]:
  """Runs the named evals (default: the config's `evals.names`) on the newest checkpoint in
  `workdir`; returns {name: {"json": path, "png": path, "result": dict (a list for perplexity)}}.

  perplexity scores the training source's held-out split, or `text_paths` (local files, one document
  each), at each of `lengths`, streamed in segments of `segment_len` (default: the training length)
  and capped at `max_tokens` tokens per length (0: all; default: the config's evals.max_tokens).

  babilong with `babilong_path` scores the published BABILong data read from that local folder
  (memarch.evals.babilong_data; `lengths` pick its length folders by size, e.g. 1000 -> 1k, and
  `tasks` may be qa1..qa20) instead of our generator.

  harness runs lm-evaluation-harness `tasks` (names such as piqa, or tasks of YAMLs under
  `include_path`), `limit` examples per task (a fraction when < 1), with `num_fewshot` shots."""
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  workdir = os.path.abspath(workdir)
  wanted = parse_names(names)  # unknown names fail before anything is loaded
  cfg, data, model, step = load_workdir(workdir)
  wanted = wanted or parse_names(_evals_default(cfg, "names"))
  harness_tasks = None
  if "harness" in wanted:  # --tasks names harness tasks here, not BABILong tasks
    if "babilong" in wanted:
      raise EvalError("--tasks names the tasks of one eval: run --evals=babilong and --evals=harness "
                      "separately")
    if not tasks:
      raise EvalError("--evals=harness needs --tasks, e.g. --tasks=piqa,hellaswag (lm-eval task "
                      "names, or tasks of YAMLs under --include_path)")
    harness_tasks, tasks = list(tasks), None
  from memarch.data import babilong as babilong_lib
  from memarch.evals import babilong_data, long_context, plots, report

  opts = dict(lengths=lengths, num_examples=num_examples, segment_len=segment_len,
              batch_size=batch_size, depths=depths, tasks=tasks)
  opts = {k: (tuple(v) if isinstance(v, list) else v) if v is not None else _evals_default(cfg, k)
          for k, v in opts.items()}
  valid = babilong_data.TASKS if babilong_path else babilong_lib.TASKS  # published: qa1..qa20
  for t in (tasks or []) if babilong_path else opts["tasks"]:
    if t not in valid:
      raise EvalError(f"unknown BABILong task {t!r}; choose from {', '.join(valid)}")
  if min(opts["lengths"]) < 1 or opts["num_examples"] < 1 or opts["segment_len"] < 1:
    raise EvalError("lengths, num_examples and segment_len must be positive")
  runner = make_runner(model, data, opts["segment_len"])
  trained_on = cfg.data.name
  out_dir = os.path.join(workdir, "eval")
  arch = "+".join(cfg.model.layer_pattern)
  meta = {"workdir": workdir, "step": step, "arch": arch, "trained_on": trained_on}
  results = {}
  for name in wanted:
    t0 = time.time()
    if name == "perplexity":
      results[name] = _run_perplexity(cfg, data, model, step, out_dir, arch, lengths=opts["lengths"],
                                      segment_len=segment_len, batch_size=opts["batch_size"],
                                      text_paths=text_paths, max_tokens=max_tokens, log=log)
      continue
    if name == "harness":
      results[name] = _run_harness(cfg, data, runner, meta, out_dir, tasks=harness_tasks,
                                   limit=limit, include_path=include_path, num_fewshot=num_fewshot,
                                   batch_size=opts["batch_size"], seed=seed, log=log)
      continue
    if name in TEXT_EVALS and trained_on == "mqar":
      raise EvalError(f"the {name} eval needs a model trained on text (data.name babilong, passkey, "
                      f"niah, text or tfds); {workdir} was trained on mqar")
    if name == "mqar" and trained_on != "mqar":
      raise EvalError(f"the mqar eval needs a model trained on data.name=mqar; {workdir} was trained "
                      f"on {trained_on}")
    common = dict(num_examples=opts["num_examples"], batch_size=opts["batch_size"], seed=seed,
                  log=log)
    try:
      if name != "mqar":
        tok = workdir_tokenizer(cfg, data)
      if name == "babilong":
        if babilong_path:
          res = _published_babilong(runner, babilong_path, tasks=tasks, lengths=lengths,
                                    num_examples=opts["num_examples"], tokenizer=tok,
                                    batch_size=opts["batch_size"], log=log)
        else:
          res = long_context.evaluate_babilong(runner, tasks=opts["tasks"],
                                               lengths=opts["lengths"], tokenizer=tok, **common)
        grid = [[res["accuracy"][t][str(l)] for l in res["lengths"]] for t in res["tasks"]]
        grid.append([res["mean"][str(l)] for l in res["lengths"]])
        png = plots.heatmap(grid, res["tasks"] + ["mean"], res["lengths"],
                            os.path.join(out_dir, "babilong.png"), xlabel="context length (tokens)",
                            ylabel="task",
                            title=f"{res['name']}, {arch}, step {step}\n{res['metric']}")
      elif name in ("passkey", "niah"):
        fn = long_context.evaluate_passkey if name == "passkey" else long_context.evaluate_niah
        res = fn(runner, lengths=opts["lengths"], depths=opts["depths"], tokenizer=tok, **common)
        key, vmax = ("score", 100.0) if name == "niah" else ("accuracy", 1.0)
        grid = [[res[key][str(d)][str(l)] for l in res["lengths"]] for d in res["depths"]]
        png = plots.heatmap(grid, [f"{d:g}" for d in res["depths"]], res["lengths"],
                            os.path.join(out_dir, f"{name}.png"), xlabel="prompt length (tokens)",
                            ylabel="depth", vmax=vmax, fmt="{:.2f}" if vmax == 1.0 else "{:.0f}",
                            title=f"{res['name']}, {arch}, step {step}\n"
                                  f"{'string_match_all (greedy)' if name == 'niah' else res['metric']}")
      else:
        settings = parse_settings(mqar_settings) if mqar_settings else []
        settings = settings or [(int(cfg.data.seq_len), int(cfg.data.num_kv_pairs))]
        n = int(num_examples) if num_examples is not None else int(cfg.data.eval_examples)
        res = evaluate_mqar(runner, data, settings, num_examples=n, batch_size=opts["batch_size"])
        md = os.path.join(out_dir, "mqar.md")
        os.makedirs(out_dir, exist_ok=True)
        with open(md, "w") as f:
          f.write(mqar_markdown(res, f"MQAR accuracy, {arch}, step {step}"))
        png = plots.bars([f"L={r['seq_len']} K={r['num_kv_pairs']}" for r in res["rows"]],
                         [r["accuracy"] for r in res["rows"]], os.path.join(out_dir, "mqar.png"),
                         title=f"MQAR test accuracy, {arch}, step {step}")
        for r in res["rows"]:
          log(f"mqar L={r['seq_len']} K={r['num_kv_pairs']}: accuracy {r['accuracy']:.4f}")
    except (ValueError, FileNotFoundError) as e:
      raise EvalError(f"{name}: {e}") from None
    res.update(meta, wall_sec=time.time() - t0)
    path = _write_json(os.path.join(out_dir, f"{name}.json"), res)
    report.append(workdir, report.rows_of(name, res), step=step, arch=arch)
    log(f"memarch: {name} -> {path}, {png}")
    results[name] = {"json": path, "png": png, "result": res}
  return results


def _run_perplexity(cfg, data, model, step, out_dir, arch, *, lengths, segment_len, batch_size,
                    text_paths, max_tokens, log) -> dict:
  """The perplexity eval (memarch.evals.perplexity) for run_evals."""
  from memarch.data import text as text_lib
  from memarch.data.tokenizer import encode_document
  from memarch.evals import perplexity
  trained_on = cfg.data.name
  if trained_on in ("mqar", "memorization"):
    raise EvalError(f"the perplexity eval needs a model trained on text (data.name shakespeare, "
                    f"text, tfds, ...); {trained_on} models have no text tokenizer")
  tok = getattr(data, "tokenizer", None)
  if tok is None or not hasattr(tok, "token_bytes"):
    raise EvalError(f"data.name={trained_on} has no tokenizer with byte lengths for bits per byte")
  if getattr(data, "landmark_block", 0):
    raise EvalError("the perplexity eval does not insert landmark tokens; evaluate landmark-layout "
                    "models with passkey or niah")
  try:
    if text_paths:
      paths = [os.path.abspath(p) for p in text_paths]
      eos = np.asarray([tok.eos_id], np.int32)
      docs = [np.concatenate([encode_document(tok, d, origin), eos])
              for origin, d in text_lib.read_documents(paths)]
      if not docs:
        raise EvalError(f"the files {', '.join(paths)} hold no text")
      source = "files: " + ", ".join(os.path.basename(p) for p in paths)
    else:
      docs = data.eval_documents() if hasattr(data, "eval_documents") else None
      if not docs:
        raise EvalError(f"data.name={trained_on} has no held-out split here; pass --text_paths="
                        "a.txt,b.txt (local files) to score")
      source = f"{trained_on} held-out"
  except (FileNotFoundError, ValueError) as e:
    raise EvalError(f"perplexity: {e}") from None
  if max_tokens is None:
    ev = cfg.get("evals", None)
    max_tokens = int(ev.get("max_tokens", 0)) if ev is not None else 0
  docs = perplexity.cap_documents(docs, max_tokens)
  train_len = int(cfg.data.seq_len)
  t0 = time.time()
  try:
    rows = perplexity.evaluate_perplexity(model, docs, lengths=lengths, train_len=train_len,
                                          token_bytes=tok.token_bytes,
                                          segment_len=segment_len or train_len,
                                          batch_size=batch_size, source=source, log=log)
  except ValueError as e:
    raise EvalError(f"perplexity: {e}") from None
  workdir = os.path.dirname(out_dir)
  for r in rows:
    r.update(step=step, arch=arch, tokenizer=getattr(tok, "name", type(tok).__name__),
             wall_sec=time.time() - t0)
  path = os.path.join(out_dir, "perplexity.json")
  merged = perplexity.merge_rows(path, rows)
  from memarch.evals import report
  report.append(workdir, report.rows_of("perplexity", rows), step=step, arch=arch)
  png = perplexity.plot(merged, os.path.join(out_dir, "perplexity.png"), train_len=train_len,
                        title=f"held-out bits per byte vs context length, {arch}, step {step}\n"
                              f"{workdir}")
  log(f"memarch: perplexity -> {path}, {png}")
  return {"json": path, "png": png, "result": merged}


def _published_babilong(runner, path, *, tasks, lengths, num_examples, tokenizer, batch_size,
                        log) -> dict:
  """The published BABILong data under `path` (memarch.evals.babilong_data); `lengths` (numbers)
  pick length folders by size (1000 -> 1k), default all."""
  from memarch.evals import babilong_data
  names = babilong_data.lengths_in(path)
  if lengths:
    keys = {babilong_data.length_key(n): n for n in names}
    bad = [l for l in lengths if float(l) not in keys]
    if bad:
      raise EvalError(f"--lengths {bad[0]} matches no length folder of {path} ({', '.join(names)}; "
                      "1000 selects 1k)")
    names = [keys[float(l)] for l in lengths]
  return babilong_data.evaluate(runner, path, tasks=tasks, lengths=names, num_examples=num_examples,
                                tokenizer=tokenizer, batch_size=batch_size, log=log)


def _run_harness(cfg, data, runner, meta, out_dir, *, tasks, limit, include_path, num_fewshot,
                 batch_size, seed, log) -> dict:
  """The harness eval (memarch.evals.harness) for run_evals: harness.json (the harness's results,
  versions and sample counts) and harness.md (one row per task and metric)."""
  if cfg.data.name in ("mqar", "memorization"):
    raise EvalError(f"the harness eval needs a model trained on text (data.name shakespeare, text, "
                    f"tfds, ...); {meta['workdir']} was trained on {cfg.data.name}")
  from memarch.evals import harness
  if limit is not None and limit >= 1:
    limit = int(limit)  # a count (the harness reads a float below 1 as a fraction)
  t0 = time.time()
  try:
    scorer = harness.WorkdirScorer(runner, workdir_tokenizer(cfg, data), batch_size=batch_size)
    res = harness.run_harness(scorer, tasks, limit=limit, include_path=include_path,
                              num_fewshot=num_fewshot, seed=seed, log=log)
  except (ValueError, NotImplementedError) as e:
    raise EvalError(f"harness: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  out = harness.to_json(res)
  out.update(meta, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
             segment_len=runner.segment_len, wall_sec=time.time() - t0)
  path = _write_json(os.path.join(out_dir, "harness.json"), out)
  from memarch.evals import report
  report.append(meta["workdir"], report.rows_of("harness", out), step=meta["step"],
                arch=meta["arch"])
  md = os.path.join(out_dir, "harness.md")
  with open(md, "w") as f:
    f.write(harness.markdown(out["rows"], f"lm-evaluation-harness, {meta['arch']}, step "
                                          f"{meta['step']}" + (f", limit {limit:g}" if limit else "")))
  log(f"memarch: harness -> {path}, {md}")
  return {"json": path, "md": md, "result": out}
