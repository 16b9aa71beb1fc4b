"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU)."""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from layers.base import dense


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig:
  d_model: int
  hidden: int | None = None  # default: 8/3 * d_model rounded up to a multiple of 8


class SwiGLU(nnx.Module):
  """y = W_down (silu(x W_gate) * (x W_up))."""

  def __init__(self, cfg: SwiGLUConfig, *, rngs: nnx.Rngs):
    hidden = cfg.hidden or int(8 * ((8 * cfg.d_model / 3 + 7) // 8))
    self.cfg = cfg
    self.w_gate = dense(rngs, (cfg.d_model, hidden), ("embed", "mlp"))
    self.w_up = dense(rngs, (cfg.d_model, hidden), ("embed", "mlp"))
    self.w_down = dense(rngs, (hidden, cfg.d_model), ("mlp", "embed"))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = x_BTD.dtype
    h = jax.nn.silu(x_BTD @ self.w_gate[...].astype(dt)) * (x_BTD @ self.w_up[...].astype(dt))
    return h @ self.w_down[...].astype(dt)
