"""Naive take + einsum expert gathers (docs/architectures/peer.md): the oracle.

`jnp.take` materialises the gathered rows [T, K, D] and autodiff turns it into a dense scatter-add;
both are what the `xla` path avoids. Obviously correct, differentiated by JAX itself.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.expert_gather._common import ACTIVATIONS, acc_dtype


def expert_gather_reference(table_ND, indices_TK, weights_TK):
  """y[t] = sum_k weights[t, k] * table[indices[t, k]], in weights' dtype."""
  acc = acc_dtype(weights_TK.dtype)
  rows_TKD = jnp.take(table_ND, indices_TK, axis=0).astype(acc)
  return jnp.einsum("tk,tkd->td", weights_TK.astype(acc), rows_TKD).astype(weights_TK.dtype)


def expert_mlp_reference(x_TE, down_NE, up_NF, indices_TK, weights_TK, *, activation="gelu"):
  """y[t] = sum_k weights[t, k] * act(down[i] . x[t]) * up[i], i = indices[t, k] (He 2024, §2)."""
  act = ACTIVATIONS[activation]
  acc = acc_dtype(x_TE.dtype)
  down_TKE = jnp.take(down_NE, indices_TK, axis=0).astype(acc)
  up_TKF = jnp.take(up_NF, indices_TK, axis=0).astype(acc)
  z_TK = jnp.einsum("te,tke->tk", x_TE.astype(acc), down_TKE)
  coef_TK = weights_TK.astype(acc) * act(z_TK)
  return jnp.einsum("tk,tkf->tf", coef_TK, up_TKF).astype(x_TE.dtype)
