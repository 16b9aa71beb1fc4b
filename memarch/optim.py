"""Optimizer: global-norm clipping -> AdamW with a warmup + cosine or WSD (warmup-stable-decay)
schedule. Weight decay applies to matrices only: it skips vectors (norm scales, biases), per-head
gains of any shape (`layers.base.Gain`) when `decay_gains=False`, and, unless
`decay_memory_init=True`, learned initial memory states (`layers.base.MemoryInit`, e.g. W_0).

Precision (docs/design.md, "Precision and memory at scale"): the chain runs on a float32 view of
the gradients and parameters (`float32_state`), so clipping, both Adam moments and the update are
float32 whatever `model.param_dtype` (`mu_dtype` may store the first moment in bfloat16). bfloat16
parameters have no float32 master copy: `param + update` is rounded to bfloat16 stochastically
(`update_rounding`), so updates smaller than a bfloat16 step still move the weight on average.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from layers.base import Gain, MemoryInit

MU_DTYPES = ("float32", "bfloat16")
UPDATE_ROUNDINGS = ("stochastic", "nearest")


@dataclasses.dataclass(frozen=True)
class OptConfig:
  lr: float = 1e-3
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  schedule: str = "cosine"  # cosine | wsd | constant
  warmup_steps: int = 100
  decay_fraction: float = 0.2  # WSD: share of steps in the final decay
  min_lr_ratio: float = 0.0
  grad_accum: int = 1
  decay_memory_init: bool = False  # weight-decay learned initial memory states (MemoryInit)
  decay_gains: bool = True  # weight-decay per-head gains (Gain) like matrices (docs/architectures/titans.md)
  mu_dtype: str = "float32"  # Adam's first moment: float32 | bfloat16 (the second is float32)
  update_rounding: str = "stochastic"  # bfloat16 params: stochastic | nearest (float32_state)

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError(f"opt.lr must be > 0, got {self.lr}")
    if self.schedule not in ("cosine", "wsd", "constant"):
      raise ValueError(f"opt.schedule must be cosine, wsd or constant, got {self.schedule!r}")
    if self.grad_accum < 1:
      raise ValueError(f"opt.grad_accum must be >= 1, got {self.grad_accum}")
    if not 0 <= self.decay_fraction <= 1:
      raise ValueError(f"opt.decay_fraction must be in [0, 1], got {self.decay_fraction}")
    if self.mu_dtype not in MU_DTYPES:
      raise ValueError(f"opt.mu_dtype must be {' or '.join(MU_DTYPES)}, got {self.mu_dtype!r}")
    if self.update_rounding not in UPDATE_ROUNDINGS:
      raise ValueError(f"opt.update_rounding must be {' or '.join(UPDATE_ROUNDINGS)}, "
                       f"got {self.update_rounding!r}")


def schedule(cfg: OptConfig, num_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "constant":
    return optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)) if warmup else optax.constant_schedule(cfg.lr)
  if cfg.schedule == "cosine":
    # decay_steps counts the warmup and must exceed it (a 1-step run has warmup 1 and decay 2).
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1),
                                              max(num_steps, max(warmup, 1) + 1), end_value=end)
  decay = max(int(num_steps * cfg.decay_fraction), 1)
  stable = max(num_steps - warmup - decay, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
       optax.constant_schedule(cfg.lr),
       optax.linear_schedule(cfg.lr, end, decay)],
      boundaries=[max(warmup, 1), max(warmup, 1) + stable])


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def paths_of(model: nnx.Module, variable_type) -> frozenset:
  """The tree paths (as in `nnx.state(model, nnx.Param)`) of the model's `variable_type` leaves
  (a type or a tuple of types, as `isinstance` takes)."""
  params = nnx.state(model, nnx.Param)
  found = []
  jax.tree_util.tree_map_with_path(
      lambda path, v: found.append(path) if isinstance(v, variable_type) else None, params,
      is_leaf=_is_variable)
  return frozenset(found)


def decay_mask(params, no_decay_paths: frozenset = frozenset()):
  """Decay matrices only (ndim >= 2), except the leaves at `no_decay_paths`.

  optax calls the mask with Variables at init and with plain arrays at update, so the exemption is
  by tree path (collected once from the model's variable types by `paths_of`), not by type.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: getattr(p, "ndim", 0) >= 2 and path not in no_decay_paths, params,
      is_leaf=_is_variable)


def _at_least_float32(x):
  """bfloat16 (or float16) -> float32; float32 and float64 unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class RoundingState(NamedTuple):
  """float32_state's state when some parameters are bfloat16 and rounding is stochastic."""
  count: jax.Array  # steps taken: seeds the rounding noise, so a resumed run rounds the same
  inner: optax.OptState


def stochastic_round_bf16(x_f32: jax.Array, key: jax.Array) -> jax.Array:
  """float32 -> the float32 value of a bfloat16 neighbour, the upper one with probability equal to
  x's distance from the lower one in bfloat16 steps (unbiased: E[round(x)] = x). Adds 16 random
  bits to the 16 low mantissa bits that bfloat16 drops, then truncates them."""
  bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
  noise = jax.random.bits(key, x_f32.shape, jnp.uint32) & jnp.uint32(0xFFFF)
  return jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)


def float32_state(inner: optax.GradientTransformation,
                  rounding: str = "stochastic") -> optax.GradientTransformation:
  """`inner` applied to float32 copies of the gradients and parameters; bfloat16 parameters get
  their update rounded stochastically (`rounding='stochastic'`) or to nearest.

  optax creates Adam's second moment like the parameters (`zeros_like(params)`; `mu_dtype` sets
  only the first), so bfloat16 parameters would get a bfloat16 second moment and a bfloat16 norm
  for clipping: on the float32 view every state leaf is float32 (unless `mu_dtype` asks otherwise).

  `optax.apply_updates` rounds `param + update` to nearest, which drops every update below half a
  bfloat16 step of its weight (2^-9 relative): norm scales near 1 and unit-variance embeddings
  stop learning at lr ~1e-3. With stochastic rounding the returned update is `SR(param + update) -
  param`, which apply_updates adds back exactly (Gupta et al. 2015, arXiv 1502.02551, Sec. 2.2;
  for bfloat16 weights: Zamirai et al. 2020, arXiv 2010.06192, Sec. 4). With float32 parameters
  this is `inner` itself, state included (checkpoints of float32 runs are unchanged).
  """
  def low_precision(params) -> bool:
    return any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))

  def init(params):
    state = inner.init(jax.tree.map(_at_least_float32, params))
    if rounding == "stochastic" and low_precision(params):
      return RoundingState(jnp.zeros((), jnp.uint32), state)
    return state

  def update(updates, state, params=None):
    params32 = None if params is None else jax.tree.map(_at_least_float32, params)
    inner_state = state.inner if isinstance(state, RoundingState) else state
    updates32, inner_state = inner.update(jax.tree.map(_at_least_float32, updates), inner_state,
                                          params32)
    if not isinstance(state, RoundingState):
      return updates32, inner_state
    key = jax.random.fold_in(jax.random.PRNGKey(0), state.count)
    leaves, treedef = jax.tree.flatten(updates32)
    rounded = [
        u if p.dtype != jnp.bfloat16 else
        stochastic_round_bf16(p32 + u, jax.random.fold_in(key, i)) - p32
        for i, (u, p, p32) in enumerate(zip(leaves, jax.tree.leaves(params),
                                            jax.tree.leaves(params32)))]
    return jax.tree.unflatten(treedef, rounded), RoundingState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptConfig, num_steps: int,
                   model: nnx.Module | None = None) -> optax.GradientTransformation:
  """The optimizer; with `model`, its `MemoryInit` leaves skip weight decay unless the config says
  `decay_memory_init`, and its `Gain` leaves unless it says `decay_gains`."""
  exempt = tuple(t for t, decayed in ((Gain, cfg.decay_gains),
                                       (MemoryInit, cfg.decay_memory_init)) if not decayed)
  skip = paths_of(model, exempt) if model is not None and exempt else frozenset()
  return float32_state(optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mu_dtype=jnp.dtype(cfg.mu_dtype),
                  mask=functools.partial(decay_mask, no_decay_paths=skip))),
      rounding=cfg.update_rounding)
