"""RMSNorm (Zhang & Sennrich 2019) and a gated RMSNorm used by linear-recurrent output heads."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32 and cast back."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) over the last axis (float32 math)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, with a learned per-feature scale (init 1)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "embed",
               rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), (axis_name,))(
        jax.random.PRNGKey(0), (dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_normalize(x, self.eps) * self.scale[...].astype(x.dtype)
