"""The one pretraining loop for every architecture (DESIGN.md section 5):
`train_and_evaluate(config, workdir)`.

mesh -> data -> model + optimizer under the mesh -> restore if a checkpoint exists -> loop. The step is
one `jax.jit` over the split NNX state with donated buffers; metrics are fetched one step late so the
host never waits on the device; eval, checkpoints, metrics.jsonl, TensorBoard, a progress bar and a
PNG of the curves come with it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from absl import logging as absl_logging
import jax
import numpy as np
from flax import nnx

from memarch import checkpoint as ckpt_lib
from memarch import configs_lib, metrics as metrics_lib, sharding
from memarch.data import make_source
from memarch.data.mqar import IGNORE
from memarch.lm import LM, count_params
from memarch import step as step_lib
from memarch.optim import make_optimizer, schedule
from memarch.step import StepConfig


class TrainingError(RuntimeError):
  """A run stopped for a reason the user must fix (message says how)."""


def check_workdir(workdir: str, config) -> None:
  """Refuses a workdir that holds checkpoints of a different model; never overwrites its config."""
  path = os.path.join(workdir, "config.json")
  has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
      n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints")))
  if not os.path.exists(path) or not has_ckpt:
    return
  with open(path) as f:
    old = json.load(f)
  new = configs_lib.to_dict(config)
  for section in ("model", "data"):
    o, n = old.get(section, {}), json.loads(json.dumps(new[section], default=str))
    keys = sorted(set(o) | set(n))
    diff = [k for k in keys if (section == "model" or k in ("name", "seq_len", "vocab_size",
                                                            "tokenizer"))
            and o.get(k) != n.get(k)]
    if diff:
      k = diff[0]
      raise TrainingError(
          f"workdir {workdir} holds a checkpoint of a different {section} ({section}.{k}: "
          f"{o.get(k)!r} there vs {n.get(k)!r} now); use a new --workdir or restore the old config")


def write_config(workdir: str, config, step: int) -> str:
  path = os.path.join(workdir, "config.json")
  text = configs_lib.to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    path = os.path.join(workdir, f"config.resumed_at_{step}.json")
  with open(path, "w") as f:
    f.write(text)
  return path


def train_and_evaluate(config, workdir: str, *, max_steps_this_run: int | None = None,
                       quiet: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest checkpoint); returns final metrics.

  `max_steps_this_run` stops after that many steps (the run can be resumed later).
  """
  workdir = os.path.abspath(workdir)
  t_start = time.time()
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
  # ---- everything that can be wrong with the config fails here, before any compute ----
  sharding.maybe_initialize_distributed(config.mesh.distributed)
  data = make_source(config.data, seed=config.seed, workdir=workdir)
  lm_cfg = configs_lib.lm_config(config, data.vocab_size)
  opt_cfg = configs_lib.opt_config(config)
  tc = config.train
  if tc.num_steps < 1:
    raise TrainingError(f"train.num_steps must be >= 1, got {tc.num_steps}")
  if config.data.batch_size % opt_cfg.grad_accum:
    raise TrainingError(f"data.batch_size={config.data.batch_size} is not divisible by "
                        f"opt.grad_accum={opt_cfg.grad_accum}")
  if data.vocab_size > lm_cfg.vocab_size:
    raise TrainingError(f"model.vocab_size={lm_cfg.vocab_size} < data vocabulary "
                        f"{data.vocab_size}; set model.vocab_size=0 to take it from the data")
  check_workdir(workdir, config)
  os.makedirs(workdir, exist_ok=True)
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices else None
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
  log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

  with sharding.mesh_context(mesh):
    model = LM(lm_cfg, rngs=nnx.Rngs(config.seed))
    tx = make_optimizer(opt_cfg, tc.num_steps, model)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  n_params = count_params(model)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
  start_step = 0
  restored = ckpt.restore_latest(ckpt_lib.abstract_like(state))
  if restored is not None:
    step, state, data_pos = restored
    start_step = int(data_pos["next_step"])
    log(f"memarch: resumed from checkpoint at step {step} in {ckpt.directory}")
  write_config(workdir, config, start_step)

  # Only packed sources (several documents per row) need segment ids; every mixer then runs each
  # document as if alone (docs/packed_documents.md).
  packed = bool(getattr(data, "pack", False))
  step_cfg = StepConfig.from_config(config, packed=packed)
  step_fn = step_lib.jit_train_step(graphdef, step_cfg)
  predict = step_lib.jit_eval_step(graphdef, step_cfg)
  lr_at = schedule(opt_cfg, tc.num_steps)

  # ---- evaluation ----
  # Text sources (lm_eval) score fixed rows of their held-out split: loss, bits per byte and
  # perplexity; the synthetic tasks score their eval set by accuracy and loss.
  lm_eval = bool(getattr(data, "lm_eval", False))
  if lm_eval:
    eval_set = data.eval_set(int(config.data.get("eval_rows", 32)))
  else:
    eval_set = data.eval_set(config.data.eval_examples) if hasattr(data, "eval_set") else None

  def evaluate(state) -> dict[str, float]:
    if eval_set is None:
      return {}
    bs = config.data.batch_size
    n = len(eval_set["inputs"])
    correct, nats, count, nbytes = [], 0.0, 0, 0
    for i in range(0, n, bs):
      sl = {k: v[i:i + bs] for k, v in eval_set.items()}
      pad = bs - len(sl["inputs"])
      if pad:  # keep one compiled shape
        sl = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in sl.items()}
      preds, nll = predict(state, {k: sl[k] for k in ("inputs", "segment_ids", "targets")})
      preds, nll = np.asarray(preds)[:bs - pad], np.asarray(nll, np.float64)[:bs - pad]
      tgt = sl["targets"][:bs - pad]
      mask = tgt != IGNORE
      correct.append(((preds == tgt) & mask).sum(-1) / np.maximum(mask.sum(-1), 1))
      nats += float(nll.sum())
      count += int(mask.sum())
      if "target_bytes" in sl:
        nbytes += int(sl["target_bytes"][:bs - pad].sum())
    loss = nats / max(count, 1)
    if lm_eval:
      # Bits per byte: all nats of the targets (EOS included) over the UTF-8 bytes they stand for,
      # so byte-level and BPE models compare (docs/data.md).
      return {"eval/loss": loss, "eval/bits_per_byte": nats / math.log(2) / max(nbytes, 1),
              "eval/perplexity": math.exp(min(loss, 700.0))}
    return {"eval/accuracy": float(np.concatenate(correct).mean()), "eval/loss": loss}

  writer = metrics_lib.MetricWriter(workdir)
  progress = None
  end_step = tc.num_steps if max_steps_this_run is None else min(tc.num_steps, start_step + max_steps_this_run)
  if tc.progress and not quiet:
    from tqdm.auto import tqdm
    progress = tqdm(total=tc.num_steps, initial=start_step, desc="train", dynamic_ncols=True,
                    file=sys.stderr)
  log(f"memarch: {n_params:,} parameters; mixers {lm_cfg.layer_pattern}; data {config.data.name} "
      f"(seq_len {config.data.seq_len}, batch {config.data.batch_size}); mesh "
      f"{sharding.describe(mesh)}; workdir {workdir}")

  pending = None
  last: dict[str, Any] = {}
  t_last, tokens_since = time.time(), 0
  stopped_early = out_of_time = False

  def finish(step, m):
    nonlocal t_last, tokens_since
    m = jax.device_get(m)
    if not bool(m["finite"]):
      if tc.skip_nonfinite:
        log(f"memarch: skipped step {step}: non-finite loss/gradients")
      else:
        raise TrainingError(
            f"non-finite loss at step {step} (loss={float(m['loss'])}, grad_norm="
            f"{float(m['grad_norm'])}); lower opt.lr, raise opt.warmup_steps, or set "
            "train.skip_nonfinite=True")
    tokens_since += config.data.batch_size * config.data.seq_len  # all input tokens, as Zoology counts
    row = None
    if step % tc.log_every == 0 or step == end_step:
      now = time.time()
      row = {"train/loss": float(m["loss"]), "train/accuracy": float(m["acc"]),
             "train/grad_norm": float(m["grad_norm"]), "train/lr": float(lr_at(step)),
             "train/tokens_per_sec": tokens_since / max(now - t_last, 1e-9),
             "train/elapsed_sec": now - t_start}
      row.update({k: float(v) for k, v in m.items() if k.startswith(("aux/", "stats/"))})
      t_last, tokens_since = now, 0
    return row

  step = start_step
  try:
    with sharding.mesh_context(mesh):
      for step in range(start_step + 1, end_step + 1):
        batch = data.batch(step - 1)
        batch = {k: jax.device_put(np.asarray(v).reshape(v.shape), sharding.batch_sharding(mesh, v.ndim))
                 for k, v in batch.items()}
        collect = bool(tc.stats_every) and (step % tc.stats_every == 0 or step == 1)
        state, m = step_fn(state, batch, collect)
        if pending is not None:
          row = finish(*pending)
          if row is not None:
            last.update(row)
            writer.write(pending[0], row)
            if progress is not None:
              shown = (dict(bpb=f"{last.get('eval/bits_per_byte', float('nan')):.3f}") if lm_eval
                       else dict(acc=f"{last.get('eval/accuracy', float('nan')):.3f}"))
              progress.set_postfix(loss=f"{row['train/loss']:.4f}",
                                   tok_s=f"{row['train/tokens_per_sec']:.0f}", **shown)
        pending = (step, m)
        if progress is not None:
          progress.update(1)
        # A wall-clock budget (train.time_budget_s, compile included) ends the run with an eval,
        # as "accuracy reached in N minutes" comparisons need.
        over_budget = bool(tc.time_budget_s) and time.time() - t_start >= tc.time_budget_s
        is_eval = (tc.eval_every and step % tc.eval_every == 0) or step == end_step or over_budget
        if is_eval and eval_set is not None:
          ev = evaluate(state)
          last.update(ev)
          writer.write(step, ev)
          if tc.stop_at_accuracy and ev.get("eval/accuracy", 0.0) >= tc.stop_at_accuracy:
            stopped_early = True
        if over_budget and not stopped_early:
          log(f"memarch: time budget of {tc.time_budget_s:.0f}s used up at step {step}; stopping")
          out_of_time = True
        if ((tc.ckpt_every and step % tc.ckpt_every == 0) or step == end_step or stopped_early
            or out_of_time):
          ckpt.save(step, state, {"next_step": step, "data": config.data.name})
        if stopped_early or out_of_time:
          break
      if pending is not None:
        row = finish(*pending)
        if row is not None:
          last.update(row)
          writer.write(pending[0], row)
  finally:
    ckpt.close()
    writer.close()
    if progress is not None:
      progress.close()
  png = metrics_lib.plot_curves(writer.path, os.path.join(workdir, "curves.png"),
                                title=f"{', '.join(lm_cfg.layer_pattern)} on {config.data.name}")
  last.update(step=step, stopped_early=stopped_early, out_of_time=out_of_time,
              wall_sec=time.time() - t_start,
              num_params=n_params)
  if stopped_early:
    log(f"memarch: reached eval/accuracy {last['eval/accuracy']:.4f} >= "
        f"{tc.stop_at_accuracy} at step {step}; stopping")
  log(f"memarch: done at step {step} in {last['wall_sec']:.1f}s. metrics: {writer.path}; "
      f"TensorBoard: {os.path.join(workdir, 'tensorboard')}; checkpoints: {ckpt.directory}; "
      f"plot: {png}")
  return last
