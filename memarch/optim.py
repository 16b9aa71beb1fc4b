"""Optimizer: global-norm clipping -> AdamW with a warmup + cosine or WSD (warmup-stable-decay)
schedule. Weight decay skips vectors (norm scales, biases) and learned memory initial states' gates
are treated like any matrix."""
from __future__ import annotations

import dataclasses

import jax
import optax


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
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1), max(num_steps, warmup + 1),
                                              end_value=end)
  decay = max(int(num_steps * cfg.decay_fraction), 1)
  stable = max(num_steps - warmup - decay, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
       optax.constant_schedule(cfg.lr),
       optax.linear_schedule(cfg.lr, end, decay)],
      boundaries=[max(warmup, 1), max(warmup, 1) + stable])


def decay_mask(params):
  """Decay matrices only (ndim >= 2)."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg: OptConfig, num_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask))
