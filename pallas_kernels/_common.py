"""Small pieces every kernel op shares: the compute dtype, the Pallas dtype check and 2-D dots.

Ceil-division and power-of-two padding come from Pallas itself (`pl.cdiv`, `pl.next_power_of_2`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# What the Pallas kernels take; float64 (the exact tests) runs on the reference/xla paths only.
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def compute_dtype(*xs):
  """float64 when any input (pytrees and None allowed) is float64, float32 otherwise: the
  reference and xla paths accumulate in float32 whatever the input dtype, and stay exact in the
  float64 tests."""
  return (jnp.float64 if any(x.dtype == jnp.float64 for x in jax.tree.leaves(xs))
          else jnp.float32)


def check_kernel_dtypes(name: str, *arrays) -> None:
  """NotImplementedError (so dispatch with no implementation named falls back to xla) for an input
  dtype the Pallas kernels do not take."""
  for x in jax.tree.leaves(arrays):
    if jnp.dtype(x.dtype).type not in SUPPORTED_DTYPES:
      raise NotImplementedError(f"{name}: the Pallas kernels take float32/bfloat16/float16 "
                                f"inputs, got {x.dtype}")


def is_pow2(n: int, at_least: int = 1) -> bool:
  """n is a power of two >= at_least (Triton dots need power-of-two tiles of at least 16)."""
  return n >= at_least and n & (n - 1) == 0


def dot(a, b, *, ta: bool = False, tb: bool = False, precision=None, out_dtype=None):
  """a @ b for 2-D a, b, each optionally transposed (ta: a.T, tb: b.T), accumulated in
  `out_dtype` (default: a's dtype)."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=out_dtype or a.dtype)


def tile_dot(a, b, *, ta: bool = False, tb: bool = False):
  """`dot` inside a kernel tile: float32 accumulation, and IEEE float32 (HIGHEST, no TF32) when
  the operands are float32, so kernels match the float32 xla path."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return dot(a, b, ta=ta, tb=tb, precision=prec, out_dtype=jnp.float32)
