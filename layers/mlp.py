"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig:
  d_model: int
  hidden: int | None = None  # default: 8/3 * d_model rounded up to a multiple of 8


def dense_init(in_axis: str | None, out_axis: str | None, std: float | None = None):
  init = nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)
  return nnx.with_partitioning(init, (in_axis, out_axis))


class SwiGLU(nnx.Module):
  """y = W_down (silu(x W_gate) * (x W_up))."""

  def __init__(self, cfg: SwiGLUConfig, *, rngs: nnx.Rngs):
    hidden = cfg.hidden or int(8 * ((8 * cfg.d_model / 3 + 7) // 8))
    self.cfg = cfg
    self.w_gate = nnx.Param(dense_init("embed", "mlp")(rngs.params(), (cfg.d_model, hidden)))
    self.w_up = nnx.Param(dense_init("embed", "mlp")(rngs.params(), (cfg.d_model, hidden)))
    self.w_down = nnx.Param(dense_init("mlp", "embed")(rngs.params(), (hidden, cfg.d_model)))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = x_BTD.dtype
    h = jax.nn.silu(x_BTD @ self.w_gate[...].astype(dt)) * (x_BTD @ self.w_up[...].astype(dt))
    return h @ self.w_down[...].astype(dt)
