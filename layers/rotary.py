"""Rotary position embedding (RoPE; Su et al. 2021, Eq. 34), half-split layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + D/2]) by angle position * base^(-2i/D)."""
  d = x_BTHD.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head dimension, got {d}; change d_model/num_heads")
  half = d // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BTF)[:, :, None, :]
  sin = jnp.sin(angles_BTF)[:, :, None, :]
  x1, x2 = x_BTHD[..., :half].astype(jnp.float32), x_BTHD[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)
