"""The training and evaluation step of every architecture, as plain functions of (model, optimizer,
batch, settings): the training loop (memarch.train), the benchmark (scripts/bench.py), the
gradient-norm probe (scripts/grad_norms.py) and the notebooks all call these, so what is timed or
probed is what trains.

  loss_fn(model, batch, cfg)                    -> (total loss, metrics)
  train_step(model, optimizer, batch, cfg)      -> metrics   (updates model and optimizer in place)
  eval_step(model, batch, cfg)                  -> (argmax [B, T], target NLL [B, T])
  jit_train_step(graphdef, cfg) / jit_eval_step(graphdef, cfg)
                                                -> the same, jitted over the split NNX state

The loss is the mean cross-entropy over labelled targets (targets != -100) plus every auxiliary loss
the layers sow (`layers.base.AuxLoss`), each times its weight in `train.aux_loss_weights`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from layers.base import AuxLoss, Stat
from memarch import configs_lib
from memarch.data.mqar import IGNORE


class StepConfig(NamedTuple):
  """Static settings of a step (hashable: part of what jit compiles for).

  grad_accum: micro-batches per step (the batch's leading axis must divide by it).
  packed: the batch carries `segment_ids` (several documents per row) for the mixers.
  aux_weights: (name, weight) of every auxiliary loss the model may sow; a sown loss without a
    weight is an error, never a silent 1.0.
  skip_nonfinite: a step whose loss or gradient norm is not finite leaves the state unchanged
    (only in `jit_train_step`, which still has the old state).
  """
  grad_accum: int = 1
  packed: bool = False
  aux_weights: tuple[tuple[str, float], ...] = ()
  skip_nonfinite: bool = False

  @classmethod
  def from_config(cls, config, *, packed: bool) -> StepConfig:
    weights = configs_lib.to_dict(config.train.aux_loss_weights)
    return cls(grad_accum=configs_lib.opt_config(config).grad_accum, packed=bool(packed),
               aux_weights=tuple(sorted((k, float(v)) for k, v in weights.items())),
               skip_nonfinite=bool(config.train.skip_nonfinite))


def cross_entropy(logits_BTV, targets_BT):
  """Mean cross-entropy over labelled positions (targets != -100), in float32; returns
  (loss, number of labelled positions)."""
  mask = targets_BT != IGNORE
  safe = jnp.where(mask, targets_BT, 0)
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  n = jnp.maximum(mask.sum(), 1)
  return jnp.sum(jnp.where(mask, nll, 0.0)) / n, mask.sum()


def _flat_name(path) -> str:
  parts = []
  for p in path:
    key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", None)))
    if key in ("value",) or isinstance(p, jax.tree_util.SequenceKey):
      continue
    parts.append(str(key))
  return ".".join(parts)


def flatten_sown(state) -> dict[str, jax.Array]:
  """nnx.capture output -> {'blocks.0.mixer.surprise_norm': scalar} (mean over repeated sows)."""
  out: dict[str, list] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    out.setdefault(_flat_name(path), []).append(jnp.mean(leaf.astype(jnp.float32)))
  return {k: jnp.mean(jnp.stack(v)) for k, v in out.items()}


def aux_weight(name: str, weights: dict[str, float]) -> float:
  """The weight of the sown auxiliary loss `name` ('blocks.0.mixer.balance' -> weights['balance'])."""
  short = name.rsplit(".", 1)[-1]
  if short not in weights:
    raise ValueError(f"the model sows an auxiliary loss '{short}' ({name}) with no weight: set "
                     f"--config.train.aux_loss_weights.{short}=<weight> (0 turns it off)")
  return weights[short]


def loss_fn(model, batch, cfg: StepConfig, collect_stats: bool = False):
  """(total loss, metrics) of `model` on `batch` ({'inputs', 'targets'[, 'segment_ids']}).

  metrics: loss (cross-entropy), acc (argmax accuracy on labelled targets), tokens (labelled
  count), 'aux/<name>' per auxiliary loss, and 'stats/<name>' per sown statistic when
  collect_stats (statistics cost a little, so the loop asks for them every few steps).
  """
  types = (AuxLoss, Stat) if collect_stats else (AuxLoss,)
  seg = batch["segment_ids"] if cfg.packed else None
  (logits, _), *sown = nnx.capture(model, *types)(batch["inputs"], segment_ids_BT=seg)
  loss, n = cross_entropy(logits, batch["targets"])
  aux = flatten_sown(sown[0])
  weights = dict(cfg.aux_weights)
  total = loss + sum((aux_weight(k, weights) * v for k, v in aux.items()), 0.0)
  stats = flatten_sown(sown[1]) if collect_stats else {}
  mask = batch["targets"] != IGNORE
  acc = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) & mask) / jnp.maximum(mask.sum(), 1)
  return total, dict(loss=loss, acc=acc, tokens=n, **{f"aux/{k}": v for k, v in aux.items()},
                     **{f"stats/{k}": v for k, v in stats.items()})


def train_step(model, optimizer, batch, cfg: StepConfig, collect_stats: bool = False):
  """One optimizer step: gradients averaged over `cfg.grad_accum` micro-batches (scanned, so one
  micro-batch's activations live at a time, float32 sums), then `optimizer.update`. Updates `model` and
  `optimizer` in place; returns the metrics of `loss_fn` (averaged; tokens summed) plus grad_norm
  (before clipping) and finite (loss and gradient norm both finite)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  accum = cfg.grad_accum
  micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

  def loss_of(params, mb):
    return loss_fn(nnx.merge(graphdef, params, rest), mb, cfg, collect_stats)

  def body(carry, mb):
    (_, metrics), g = jax.value_and_grad(loss_of, has_aux=True)(params, mb)
    return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, (g, metrics)), None

  first = jax.tree.map(lambda x: x[0], micro)
  metrics_shape = jax.eval_shape(lambda: loss_of(params, first)[1])
  # Gradients accumulate in float32 even for bfloat16 parameters (model.param_dtype).
  zero = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                       params),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
  (grads, metrics), _ = jax.lax.scan(body, zero, micro)
  grads = jax.tree.map(lambda g: g / accum, grads)
  metrics = {k: (v if k == "tokens" else v / accum) for k, v in metrics.items()}
  grad_norm = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return dict(metrics, grad_norm=grad_norm,
              finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm))


def eval_step(model, batch, cfg: StepConfig):
  """(argmax [B, T], negative log-likelihood of each target [B, T], 0 where unlabelled)."""
  seg = batch["segment_ids"] if cfg.packed else None
  logits, _ = model(batch["inputs"], segment_ids_BT=seg)
  targets = batch["targets"]
  mask = targets != IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.argmax(logits, -1), jnp.where(mask, nll, 0.0)


def jit_train_step(graphdef, cfg: StepConfig) -> Callable:
  """`train_step` jitted over the split state of (model, optimizer), state buffers donated:
  fn(state, batch, collect_stats) -> (new state, metrics). With cfg.skip_nonfinite a non-finite
  step returns the old state."""
  def step(state, batch, collect_stats):
    # nnx.merge shares Variables with `state`, so the update would change these leaves too: keep
    # a copy of the state before it for skip_nonfinite.
    before = jax.tree.map(lambda x: x, state) if cfg.skip_nonfinite else None
    model, optimizer = nnx.merge(graphdef, state)
    metrics = train_step(model, optimizer, batch, cfg, collect_stats)
    new_state = nnx.state((model, optimizer))
    if cfg.skip_nonfinite:
      new_state = jax.tree.map(lambda n, o: jnp.where(metrics["finite"], n, o), new_state, before)
    return new_state, metrics
  return jax.jit(step, donate_argnums=0, static_argnums=2)


def jit_eval_step(graphdef, cfg: StepConfig) -> Callable:
  """`eval_step` jitted over the split state of (model, optimizer): fn(state, batch)."""
  def step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return eval_step(model, batch, cfg)
  return jax.jit(step)
