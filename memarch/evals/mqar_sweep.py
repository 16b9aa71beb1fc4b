"""MQAR sweep in the Zoology protocol (Arora et al. 2023, arXiv 2312.04927) at CPU sizes.

  python -m memarch.evals.mqar_sweep --configs=transformer,gated_deltanet --settings=64:4,128:8 \\
      --d_models=64 --lrs=1e-3,3e-3,1e-2 --max_steps=1500 --out=runs/mqar_sweep

For every config x (seq_len, kv) setting x d_model x learning rate, one `train_and_evaluate` run
(stop_at_accuracy 0.99, a step budget and optionally a wall-time budget) in `<out>/runs/<name>`; per
(config, setting, d_model) the best run over the LRs is kept, as Zoology reports (ties: fewer steps).
Written to `<out>`: `mqar_sweep.json` (every run and the best rows), `mqar_sweep.md` (the table) and
`mqar_sweep.png` (accuracy vs state bytes per layer, Based Fig. 2 style).

A config is a config file spec (`configs/titans.py:variant=mag`), a family name with a file in
configs/ (`transformer` -> configs/transformer.py), or a registered sequence mixer name (`swa`,
`titans_mal`: base_config with that mixer and its default options). The family's model (layers,
heads, MLP) is kept; Zoology's 2-layer no-MLP models differ in that [ours]. Finished runs are read back
from `<run>/result.json`, so an interrupted sweep resumes where it stopped.

State size (Zoology plots accuracy against it): the bytes of the leaves of
`init_state(batch=1, max_len=seq_len)` per layer (float32 states, as allocated: attention counts its
KV cache at the sequence length plus its position bookkeeping, recurrent mixers their matrices,
momentum and conv tails).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def load_named_config(spec: str, size: str = "tiny"):
  """A config spec, family name or registry mixer name -> an unlocked ConfigDict."""
  from memarch import configs_lib, registry
  if ".py" in spec:
    c = configs_lib.load_config(spec)
  elif os.path.exists(os.path.join(ROOT, "configs", spec + ".py")):
    c = configs_lib.load_config(os.path.join(ROOT, "configs", spec + ".py") + f":size={size}")
  elif spec in registry.SEQUENCE_MIXERS:
    c = configs_lib.base_config(size)
    c.model.layer_pattern = (spec,)
    c.model.mixer = {spec: {}}
  else:
    raise ValueError(f"unknown config {spec!r}: not a config file, a configs/<name>.py family or a "
                     f"registered mixer ({', '.join(sorted(registry.SEQUENCE_MIXERS))})")
  c.unlock()
  return c


def state_bytes_per_layer(cfg, seq_len: int) -> list[int]:
  """Bytes of each layer's `init_state(1, max_len=seq_len)` leaves, computed abstractly."""
  from flax import nnx

  from memarch import configs_lib, sharding
  from memarch.data import make_source
  from memarch.lm import LM
  data = make_source(cfg.data, seed=0)
  lm_cfg = configs_lib.lm_config(cfg, data.vocab_size)
  with sharding.mesh_context():
    # Build inside eval_shape too: some initial states come from parameters (Titans' W_0).
    states = jax.eval_shape(
        lambda: LM(lm_cfg, rngs=nnx.Rngs(0)).init_state(1, max_len=seq_len))
  return [int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(s)))
          for s in states]


def _run_name(config: str, seq_len: int, kv: int, d_model: int, lr: float) -> str:
  safe = "".join(ch if ch.isalnum() else "_" for ch in config).strip("_")
  return f"{safe}_L{seq_len}_K{kv}_d{d_model}_lr{lr:g}"


def run_one(config: str, seq_len: int, kv: int, d_model: int, lr: float, out_dir: str, *,
            max_steps: int, max_seconds: float = 0.0, batch_size: int | None = None,
            eval_examples: int | None = None, eval_every: int | None = None, size: str = "tiny",
            quiet: bool = True) -> dict:
  """One MQAR training run (resumable); returns its result row."""
  from memarch.train import train_and_evaluate
  workdir = os.path.join(out_dir, "runs", _run_name(config, seq_len, kv, d_model, lr))
  result_path = os.path.join(workdir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  c = load_named_config(config, size)
  c.data.name = "mqar"
  c.data.seq_len, c.data.num_kv_pairs = seq_len, kv
  if batch_size:
    c.data.batch_size = batch_size
  if eval_examples:
    c.data.eval_examples = eval_examples
  c.model.d_model = d_model
  if d_model % c.model.num_heads:
    c.model.num_heads = 1
  c.opt.lr = lr
  c.opt.warmup_steps = min(c.opt.warmup_steps, max(1, max_steps // 10))
  c.train.num_steps = max_steps
  c.train.stop_at_accuracy = 0.99  # Zoology stops above 0.99 validation accuracy
  c.train.eval_every = eval_every or min(c.train.eval_every or max_steps, max_steps)
  c.train.ckpt_every = 0
  c.train.progress = False
  c.train.stats_every = 0
  if c.data.batch_size % jax.device_count():
    c.mesh.num_devices = 1  # a small CPU batch that does not split over the host's devices
  c.lock()
  t0 = time.time()
  # A wall-time budget is checked between rounds of `eval_every` steps (each round resumes from the
  # checkpoint the previous one left, so the result equals one uninterrupted run).
  chunk = c.train.eval_every if max_seconds else None
  while True:
    m = train_and_evaluate(c, workdir, max_steps_this_run=chunk, quiet=quiet)
    if (chunk is None or m.get("stopped_early") or m["step"] >= max_steps
        or time.time() - t0 >= max_seconds):
      break
  per_layer = state_bytes_per_layer(c, seq_len)
  row = {"config": config, "seq_len": seq_len, "num_kv_pairs": kv, "d_model": d_model, "lr": lr,
         "accuracy": float(m.get("eval/accuracy", float("nan"))), "steps": int(m["step"]),
         "wall_sec": time.time() - t0, "reached_0.99": bool(m.get("stopped_early", False)),
         "num_params": int(m["num_params"]), "state_bytes_per_layer": int(max(per_layer)),
         "state_bytes_layers": per_layer, "layer_pattern": list(c.model.layer_pattern),
         "vocab_size": int(c.data.vocab_size), "batch_size": int(c.data.batch_size),
         "workdir": workdir}
  with open(result_path, "w") as f:
    json.dump(row, f, indent=2)
  return row


def best_over_lrs(runs: Sequence[dict]) -> list[dict]:
  """Per (config, seq_len, kv, d_model): the run with the highest accuracy (ties: fewer steps)."""
  def rank(r):
    return (-1.0 if np.isnan(r["accuracy"]) else r["accuracy"], -r["steps"])
  best: dict[tuple, dict] = {}
  for r in runs:
    key = (r["config"], r["seq_len"], r["num_kv_pairs"], r["d_model"])
    if key not in best or rank(r) > rank(best[key]):
      best[key] = r
  return list(best.values())


def markdown_table(best: Sequence[dict], runs: Sequence[dict]) -> str:
  lines = ["# MQAR sweep (Zoology protocol, CPU sizes; best over LRs)", "",
           "| config | L | K | d_model | accuracy | best lr | steps | wall s | state bytes/layer "
           "| params | accuracy per lr |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for b in best:
    per_lr = ", ".join(f"{r['lr']:g}: {r['accuracy']:.3f}" for r in runs
                       if (r["config"], r["seq_len"], r["num_kv_pairs"], r["d_model"])
                       == (b["config"], b["seq_len"], b["num_kv_pairs"], b["d_model"]))
    lines.append(f"| {b['config']} | {b['seq_len']} | {b['num_kv_pairs']} | {b['d_model']} | "
                 f"{b['accuracy']:.4f} | {b['lr']:g} | {b['steps']} | {b['wall_sec']:.1f} | "
                 f"{b['state_bytes_per_layer']:,} | {b['num_params']:,} | {per_lr} |")
  return "\n".join(lines) + "\n"


def run_sweep(configs: Sequence[str], settings: Sequence[tuple[int, int]], d_models: Sequence[int],
              lrs: Sequence[float], out_dir: str, *, max_steps: int = 1500, max_seconds: float = 0.0,
              batch_size: int | None = None, eval_examples: int | None = None,
              eval_every: int | None = None, size: str = "tiny", log=None) -> dict:
  """Runs the whole grid; writes mqar_sweep.{json,md,png} in out_dir and returns their paths and
  rows."""
  from memarch.evals import plots
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  if not (configs and settings and d_models and lrs):
    raise ValueError("the sweep needs at least one config, setting, d_model and lr")
  runs = []
  for config in configs:
    load_named_config(config, size)  # fail on a bad name before any training
  for config in configs:
    for seq_len, kv in settings:
      for d in d_models:
        for lr in lrs:
          r = run_one(config, seq_len, kv, d, lr, out_dir, max_steps=max_steps,
                      max_seconds=max_seconds, batch_size=batch_size, eval_examples=eval_examples,
                      eval_every=eval_every, size=size)
          log(f"mqar_sweep {config} L={seq_len} K={kv} d={d} lr={lr:g}: accuracy "
              f"{r['accuracy']:.4f} at step {r['steps']} ({r['wall_sec']:.1f}s), state "
              f"{r['state_bytes_per_layer']:,} B/layer")
          runs.append(r)
  best = best_over_lrs(runs)
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"mqar_sweep.{k}") for k in ("json", "md", "png")}
  with open(paths["json"], "w") as f:
    json.dump({"best": best, "runs": runs, "protocol": {
        "settings": [list(s) for s in settings], "d_models": list(d_models), "lrs": list(lrs),
        "max_steps": max_steps, "max_seconds": max_seconds, "stop_at_accuracy": 0.99,
        "size": size}}, f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(markdown_table(best, runs))
  plots.accuracy_vs_state(best, paths["png"])
  log(f"memarch: MQAR sweep table {paths['md']}, plot {paths['png']}")
  return {"paths": paths, "best": best, "runs": runs}


def _floats(text): return [float(x) for x in text.split(",") if x]
def _ints(text): return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m memarch.evals.mqar_sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", required=True, help="comma-separated config specs or names")
  p.add_argument("--settings", default="64:4,128:8", help="seq_len:kv list")
  p.add_argument("--d_models", default="64")
  p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
  p.add_argument("--max_steps", type=int, default=1500)
  p.add_argument("--max_seconds", type=float, default=0.0, help="wall budget per run (0 = none)")
  p.add_argument("--batch_size", type=int, default=None)
  p.add_argument("--eval_examples", type=int, default=None)
  p.add_argument("--eval_every", type=int, default=None)
  p.add_argument("--size", default="tiny")
  p.add_argument("--out", default="runs/mqar_sweep")
  a = p.parse_args(argv)
  from memarch.evals.runner import EvalError, parse_settings
  from memarch.train import TrainingError
  try:
    run_sweep([c for c in a.configs.split(",") if c], parse_settings(a.settings), _ints(a.d_models),
              _floats(a.lrs), a.out, max_steps=a.max_steps, max_seconds=a.max_seconds,
              batch_size=a.batch_size, eval_examples=a.eval_examples, eval_every=a.eval_every,
              size=a.size)
  except (EvalError, TrainingError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
