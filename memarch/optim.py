"""Optimizer: global-norm clipping -> AdamW with a warmup + cosine or WSD (warmup-stable-decay)
schedule. Weight decay applies to matrices only: it skips vectors (norm scales, biases) and, unless
`decay_memory_init=True`, learned initial memory states (`layers.base.MemoryInit`, e.g. W_0)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import optax
from flax import nnx

from layers.base import MemoryInit


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

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError(f"opt.lr must be > 0, got {self.lr}")
    if self.schedule not in ("cosine", "wsd", "constant"):
      raise ValueError(f"opt.schedule must be cosine, wsd or constant, got {self.schedule!r}")
    if self.grad_accum < 1:
      raise ValueError(f"opt.grad_accum must be >= 1, got {self.grad_accum}")
    if not 0 <= self.decay_fraction <= 1:
      raise ValueError(f"opt.decay_fraction must be in [0, 1], got {self.decay_fraction}")


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
  """The tree paths (as in `nnx.state(model, nnx.Param)`) of the model's `variable_type` leaves."""
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


def make_optimizer(cfg: OptConfig, num_steps: int,
                   model: nnx.Module | None = None) -> optax.GradientTransformation:
  """The optimizer; with `model`, its `MemoryInit` leaves skip weight decay (unless the config
  says `decay_memory_init`)."""
  skip = frozenset() if model is None or cfg.decay_memory_init else paths_of(model, MemoryInit)
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=functools.partial(decay_mask,
                                                                        no_decay_paths=skip)))
