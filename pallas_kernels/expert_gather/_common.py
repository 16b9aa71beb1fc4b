"""Shared pieces of the expert-gather implementations: activations, dtypes, argument checks."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    # Exact (erf) GELU: PEER names "ReLU or GELU" without saying which GELU [ours].
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    # UltraMemV2's pre-score has no activation (arXiv:2508.18756 Eq. 15).
    "identity": lambda z: z,
}


def acc_dtype(dtype):
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def check(name, indices, weights, tables, x=None):
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"{name}: indices must be integers, got {indices.dtype}")
  if weights.shape != indices.shape:
    raise ValueError(f"{name}: weights {weights.shape} must have the shape of indices {indices.shape}")
  n = tables[0].shape[0]
  for t in tables:
    if t.ndim != 2 or t.shape[0] != n:
      raise ValueError(f"{name}: tables must be [N, D] with a common N, got {[u.shape for u in tables]}")
  if x is not None:
    if x.shape[:-1] != indices.shape[:-1]:
      raise ValueError(f"{name}: x {x.shape} and indices {indices.shape} need the same leading dims")
    if x.shape[-1] != tables[0].shape[1]:
      raise ValueError(f"{name}: x width {x.shape[-1]} != down-table width {tables[0].shape[1]}")
