"""Chunked expert gathers with a sort + segment-sum custom VJP (docs/architectures/peer.md).

Three primitives carry all the work, each over fixed-size chunks so that no [T, K, D] tensor ever
exists (only [chunk, D]):

  gather_sum(table, idx, w)      y[t]  = sum_k w[t,k] table[idx[t,k]]        (forward, dx)
  gather_dot(x, table, idx)      z[t,k] = x[t] . table[idx[t,k]]            (scores, dw)
  scatter_rows(order, idx, c, x) G[n]  = sum_{idx[t,k]=n} c[t,k] x[t]       (table gradients)

`scatter_rows` sorts the T*K (row, token, coefficient) triples by row once (`argsort`, shared by both
PEER tables) and accumulates each chunk of sorted triples with an `indices_are_sorted` segment sum into
the float32 gradient: deterministic, no dense [T*K, D] contribution tensor, no atomics needed.

Residuals: PEER saves (x, idx, w, z) and the tables it already holds; every gathered row is re-gathered
in the backward.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.expert_gather._common import ACTIVATIONS, acc_dtype

DEFAULT_CHUNK = 8192  # (token, slot) entries per chunk: the working set is chunk x D floats.


def _token_chunks(num_tokens: int, k: int, chunk: int) -> tuple[int, int]:
  c = max(1, min(num_tokens, chunk // max(k, 1)))
  return c, math.ceil(num_tokens / c)


def _pad0(a, n):
  return a if a.shape[0] == n else jnp.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _map_token_chunks(body, arrays, num_tokens, k, chunk):
  """Applies body to token chunks of `arrays` (all [T, ...]) and concatenates the [C, ...] results."""
  c, nc = _token_chunks(num_tokens, k, chunk)
  if nc == 1:
    return body(*arrays)
  padded = [_pad0(a, nc * c).reshape(nc, c, *a.shape[1:]) for a in arrays]
  out = jax.lax.map(lambda args: body(*args), tuple(padded))
  return out.reshape(nc * c, *out.shape[2:])[:num_tokens]


def gather_sum(table_ND, idx_TK, w_TK, *, chunk=DEFAULT_CHUNK, dtype=None):
  """y[t] = sum_k w[t,k] table[idx[t,k]] in float32 (float64) accumulation; rows cast to `dtype`."""
  dtype = dtype or w_TK.dtype
  acc = acc_dtype(dtype)

  def body(i_CK, w_CK):
    rows = jnp.take(table_ND, i_CK, axis=0).astype(dtype)
    return jnp.einsum("ck,ckd->cd", w_CK.astype(dtype), rows, preferred_element_type=acc)

  return _map_token_chunks(body, (idx_TK, w_TK), idx_TK.shape[0], idx_TK.shape[1], chunk)


def gather_dot(x_TD, table_ND, idx_TK, *, chunk=DEFAULT_CHUNK, dtype=None):
  """z[t,k] = x[t] . table[idx[t,k]] with float32 (float64) accumulation."""
  dtype = dtype or x_TD.dtype
  acc = acc_dtype(dtype)

  def body(x_CD, i_CK):
    rows = jnp.take(table_ND, i_CK, axis=0).astype(dtype)
    return jnp.einsum("cd,ckd->ck", x_CD.astype(dtype), rows, preferred_element_type=acc)

  return _map_token_chunks(body, (x_TD, idx_TK), idx_TK.shape[0], idx_TK.shape[1], chunk)


def sort_entries(idx_TK):
  """The row-sorted order of the flattened (token, slot) entries, shared by every table gradient."""
  flat = idx_TK.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  return flat[order], (order // idx_TK.shape[1]).astype(jnp.int32), order


def scatter_rows(sorted_entries, coef_TK, x_TD, num_rows, *, chunk=DEFAULT_CHUNK, acc=jnp.float32):
  """G[n] = sum over entries with idx = n of coef * x[token]: a sorted segment sum, chunk by chunk.

  Padding entries point at the last row with coefficient 0, which keeps the ids sorted.
  """
  rows_E, tok_E, order_E = sorted_entries
  coef_E = coef_TK.reshape(-1)[order_E].astype(acc)
  num_e = rows_E.shape[0]
  s = max(1, min(chunk, num_e))
  nc = math.ceil(num_e / s)
  pad = nc * s - num_e
  if pad:
    rows_E = jnp.concatenate([rows_E, jnp.full((pad,), num_rows - 1, rows_E.dtype)])
    tok_E = jnp.concatenate([tok_E, jnp.zeros((pad,), tok_E.dtype)])
    coef_E = jnp.concatenate([coef_E, jnp.zeros((pad,), coef_E.dtype)])

  def contrib(t_S, c_S):
    return c_S[:, None] * jnp.take(x_TD, t_S, axis=0).astype(acc)

  if nc == 1:
    return jax.ops.segment_sum(contrib(tok_E, coef_E), rows_E, num_segments=num_rows,
                               indices_are_sorted=True)

  def step(g_ND, chunk_args):
    r_S, t_S, c_S = chunk_args
    # In-place sorted scatter-add into the carry: the segment sum of this chunk without an [N, D]
    # temporary per chunk.
    return g_ND.at[r_S].add(contrib(t_S, c_S), indices_are_sorted=True), None

  g, _ = jax.lax.scan(step, jnp.zeros((num_rows, x_TD.shape[1]), acc),
                      (rows_E.reshape(nc, s), tok_E.reshape(nc, s), coef_E.reshape(nc, s)))
  return g


def _int_cotangent(a):
  return np.zeros(a.shape, dtype=jax.dtypes.float0)


# ----------------------------------------------------------------------------- weighted gather

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather(chunk, table_ND, idx_TK, w_TK):
  return gather_sum(table_ND, idx_TK, w_TK, chunk=chunk).astype(w_TK.dtype)


def _gather_fwd(chunk, table_ND, idx_TK, w_TK):
  return _gather(chunk, table_ND, idx_TK, w_TK), (table_ND, idx_TK, w_TK)


def _gather_bwd(chunk, res, dy_TD):
  table_ND, idx_TK, w_TK = res
  dw = gather_dot(dy_TD, table_ND, idx_TK, chunk=chunk).astype(w_TK.dtype)
  dtable = scatter_rows(sort_entries(idx_TK), w_TK, dy_TD, table_ND.shape[0], chunk=chunk,
                        acc=acc_dtype(table_ND.dtype))
  return dtable.astype(table_ND.dtype), _int_cotangent(idx_TK), dw


_gather.defvjp(_gather_fwd, _gather_bwd)


def expert_gather_xla(table_ND, indices_TK, weights_TK, *, chunk_size=DEFAULT_CHUNK):
  """y[t] = sum_k weights[t,k] table[indices[t,k]] (custom VJP, no [T, K, D] intermediate)."""
  return _gather(chunk_size, table_ND, indices_TK, weights_TK)


# ----------------------------------------------------------------------------- PEER experts

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mlp(activation, chunk, x_TE, down_NE, up_NF, idx_TK, w_TK):
  return _mlp_fwd(activation, chunk, x_TE, down_NE, up_NF, idx_TK, w_TK)[0]


def _mlp_fwd(activation, chunk, x_TE, down_NE, up_NF, idx_TK, w_TK):
  z_TK = gather_dot(x_TE, down_NE, idx_TK, chunk=chunk)
  coef_TK = w_TK.astype(z_TK.dtype) * ACTIVATIONS[activation](z_TK)
  y = gather_sum(up_NF, idx_TK, coef_TK, chunk=chunk, dtype=x_TE.dtype).astype(x_TE.dtype)
  return y, (x_TE, down_NE, up_NF, idx_TK, w_TK, z_TK)


def _mlp_bwd(activation, chunk, res, dy_TF):
  x_TE, down_NE, up_NF, idx_TK, w_TK, z_TK = res
  dt = x_TE.dtype
  r_TK = gather_dot(dy_TF, up_NF, idx_TK, chunk=chunk, dtype=dt)  # dL/d(coef)
  a_TK, act_vjp = jax.vjp(ACTIVATIONS[activation], z_TK)
  w = w_TK.astype(r_TK.dtype)
  dw_TK = a_TK * r_TK
  (dz_TK,) = act_vjp(w * r_TK)
  dx = gather_sum(down_NE, idx_TK, dz_TK, chunk=chunk, dtype=dt)
  entries = sort_entries(idx_TK)
  n = down_NE.shape[0]
  dup = scatter_rows(entries, w * a_TK, dy_TF, n, chunk=chunk, acc=acc_dtype(up_NF.dtype))
  ddown = scatter_rows(entries, dz_TK, x_TE, n, chunk=chunk, acc=acc_dtype(down_NE.dtype))
  return (dx.astype(dt), ddown.astype(down_NE.dtype), dup.astype(up_NF.dtype),
          _int_cotangent(idx_TK), dw_TK.astype(w_TK.dtype))


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def expert_mlp_xla(x_TE, down_NE, up_NF, indices_TK, weights_TK, *, activation="gelu",
                   chunk_size=DEFAULT_CHUNK):
  """y[t] = sum_k w[t,k] act(down[i] . x[t]) up[i] (sorted segment-sum custom VJP)."""
  return _mlp(activation, chunk_size, x_TE, down_NE, up_NF, indices_TK, weights_TK)
