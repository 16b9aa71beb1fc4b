"""First-step gradient norms on real text: every family at one size, against the Transformer++.

The number is what the trainer logs as train/grad_norm at step 1: the global L2 norm of the
gradient of the training loss (cross-entropy plus weighted auxiliary losses, memarch.train) on the
first batch of packed Shakespeare bytes, before clipping, at the freshly initialised parameters.
A family whose norm is far above the Transformer++'s starts training in a badly scaled state (its
first updates are mostly clipping).

  python scripts/grad_norms.py --size=170m --seq_len=128 --batch=2
  python scripts/grad_norms.py --size=small --configs=transformer,titans:variant=mac
  python scripts/grad_norms.py --size=170m --configs=titans:variant=mal --json=norms.json

`--configs` takes names of configs/<name>.py with an optional ':arg' (the config's own options,
size and task/data are added); the first entry is the reference (default: transformer). Models
are built and differentiated one at a time, so peak memory is that of the largest single model.
"""
from __future__ import annotations

import argparse
import gc
import json
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

FAMILIES = (
    "transformer", "gated_deltanet",
    "titans:variant=mac", "titans:variant=mag", "titans:variant=mal", "titans:variant=lmm",
    "miras:variant=moneta", "miras:variant=yaad", "miras:variant=memora",
    "mom", "landmark", "hcam", "peer", "ultramem",
)
# Configs whose text option is `data=text` rather than `task=text`.
_DATA_ARG = ("peer", "ultramem")


def load(family: str, size: str, seq_len: int, batch: int, **model_overrides):
  """The text config of `family` ('titans:variant=mac') at `size`, with the row length and batch
  set; `model_overrides` replace config.model fields (e.g. d_model=128 for a quick test)."""
  from memarch import configs_lib
  name, _, arg = family.partition(":")
  text = "data=text" if name in _DATA_ARG else "task=text"
  args = ",".join(filter(None, [arg, f"size={size}", text]))
  c = configs_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py") + ":" + args)
  c.data.seq_len = seq_len
  c.data.batch_size = batch
  for k, v in model_overrides.items():
    setattr(c.model, k, v)
  return c


def first_step_grad_norm(config, batch=None, clear_caches=True) -> dict:
  """{'params', 'grad_norm', 'loss'} of `config`'s freshly initialised LM on its first training
  batch (or `batch`: inputs, targets, segment_ids), with the training loss (memarch.step.loss_fn).
  clear_caches: drop JAX's compiled programs afterwards (the full-depth table's host memory); a
  caller measuring many small models keeps them, so the initialisers' programs compile once."""
  from memarch import configs_lib
  from memarch import step as step_lib
  from memarch.data import make_source
  from memarch.lm import LM, count_params
  from memarch.sharding import mesh_context
  data = make_source(config.data, seed=config.seed, workdir=None, may_train_tokenizer=False)
  lm_cfg = configs_lib.lm_config(config, data.vocab_size)
  step_cfg = step_lib.StepConfig.from_config(config, packed=bool(getattr(data, "pack", False)))
  if batch is None:
    batch = data.batch(0)
  batch = {k: jnp.asarray(v) for k, v in batch.items()
           if k in ("inputs", "targets", "segment_ids")}
  with mesh_context():
    model = LM(lm_cfg, rngs=nnx.Rngs(config.seed))
  n_params = count_params(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  del model

  def loss(params, batch):
    return step_lib.loss_fn(nnx.merge(graphdef, params, rest), batch, step_cfg)

  (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
  out = {"params": n_params, "grad_norm": float(optax.tree.norm(grads)),
         "loss": float(metrics["loss"])}
  if clear_caches:
    jax.clear_caches()
    gc.collect()
  return out


def table(rows: list[dict]) -> str:
  ref = rows[0]["grad_norm"]
  lines = ["| family | parameters | first-step grad norm | ratio to " + rows[0]["family"] + " |",
           "|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['family']} | {r['params']:,} | {r['grad_norm']:.4g} | "
                 f"{r['grad_norm'] / ref:.3g} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="170m", help="size preset (memarch.configs_lib.SIZES)")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--configs", default=",".join(FAMILIES),
                 help="comma-separated config names with optional ':arg' (':' args use '+' "
                      "between options, e.g. titans:variant=mac+depth=1); the first is the "
                      "reference")
  p.add_argument("--json", default="", help="also write the rows as JSON here")
  a = p.parse_args()
  families = [f.replace("+", ",") for f in a.configs.split(",") if f]
  rows = []
  for fam in families:
    r = first_step_grad_norm(load(fam, a.size, a.seq_len, a.batch))
    r["family"] = fam
    rows.append(r)
    print(f"  [row] {fam}: params={r['params']:,} grad_norm={r['grad_norm']:.6g} "
          f"loss={r['loss']:.4f}", flush=True)
  print(f"\nsize={a.size} seq_len={a.seq_len} batch={a.batch} (packed Shakespeare bytes, first "
        "batch, seed 0)\n")
  print(table(rows))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(size=a.size, seq_len=a.seq_len, batch=a.batch, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
