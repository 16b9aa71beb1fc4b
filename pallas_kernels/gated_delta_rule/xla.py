"""Chunked gated delta rule in plain JAX: the portable, autodiff-able default.

WY/UT chunk form of Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025, arXiv 2412.06464, §3.3;
steps 1-8 and the segment masks of docs/architectures/gated_deltanet.md), a `lax.scan` over chunks
whose body is `_common.chunk_step` vmapped over batch and heads. The body is under
`jax.checkpoint`, so the backward pass keeps only the chunk-boundary states (plus the inputs) and
recomputes everything inside a chunk.
T is padded to a multiple of the chunk with neutral tokens (see `_common.prepare_chunks`).
[ours] All math in float32 (float64 for float64 inputs); the output is cast back to q's dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import compute_dtype
from pallas_kernels.gated_delta_rule import _common


def _step_bh(scale, delta, precision=None):
  """chunk_step over [B, H] (masks are per batch row, shared by the heads)."""
  f = functools.partial(_common.chunk_step, scale=scale, delta=delta, precision=precision)
  f = jax.vmap(f, in_axes=(0,) * 6 + (None,) * 4 + (0,))   # heads
  return jax.vmap(f)                                        # batch


def chunk_inputs(ch: _common.Chunked):
  """Chunked -> per-chunk tiles for chunk_step, chunk axis leading: ([NT, B, H, C, ...] ...)."""
  tok = lambda x: jnp.moveaxis(x, (1, 3), (0, 2))           # [B,NT,C,H,D] -> [NT,B,H,C,D]
  col = lambda x: jnp.moveaxis(x, (1, 3), (0, 2))[..., None]   # [B,NT,C,H] -> [NT,B,H,C,1]
  row = lambda x: jnp.moveaxis(x, (1, 3), (0, 2))[..., None, :]  # -> [NT,B,H,1,C]
  mcol = lambda x: jnp.moveaxis(x, 1, 0)[..., None]          # [B,NT,C] -> [NT,B,C,1]
  mrow = lambda x: jnp.moveaxis(x, 1, 0)[..., None, :]       # -> [NT,B,1,C]
  return (tok(ch.q), tok(ch.k), tok(ch.v), col(ch.beta), col(ch.G), row(ch.G),
          mcol(ch.seg), mrow(ch.seg), mcol(ch.cin), mcol(ch.tail))


def recurrence_xla(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size, delta):
  B, T, H, K = q.shape
  V = v.shape[-1]
  dt = compute_dtype(q, k, v, beta, g, initial_state)
  scale = _common.default_scale(scale, K)
  ch = _common.prepare_chunks(q, k, v, beta, g, segment_ids, chunk_size, dt)
  S0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)
  step = _step_bh(scale, delta)

  @jax.checkpoint
  def body(S_BHKV, xs):
    o, S_next = step(*xs, S_BHKV)
    return S_next, o

  S_final, o = lax.scan(body, S0, chunk_inputs(ch))       # o: [NT, B, H, C, V]
  o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, -1, H, V)[:, :T]
  return o.astype(q.dtype), S_final


def gated_delta_rule_xla(q, k, v, beta, g, *, scale=None, initial_state=None, segment_ids=None,
                         chunk_size=64):
  return recurrence_xla(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                        segment_ids=segment_ids, chunk_size=chunk_size, delta=True)
