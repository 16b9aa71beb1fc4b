"""Query-tiled block-retrieval attention in plain JAX: the portable default.

Queries are processed `chunk_size` at a time under `lax.map`; each tile scores its queries against
every block (one GEMM), applies the gate - LSE shift and the top-k mask, and merges the block part
with the local part through a shared running max (flash style), so no [Tq, N*C + S] logits tensor
is concatenated. The tile body is wrapped in `jax.checkpoint`: backprop keeps only the tile inputs and
recomputes logits and probabilities, so peak memory is O(chunk_size * (N*C + S)) per head, not
O(Tq * (N*C + S)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import compute_dtype
from pallas_kernels.block_retrieval_attention._common import NEG_INF, block_scores, select_blocks

DEFAULT_CHUNK = 128


def _tile(q, gate, allowed, always, m_loc, q_far, blk_k, blk_v, blk_mask, k_loc, v_loc, blk_k_far,
          *, k, share, scale):
  b, t, h, _ = q.shape
  n, c = blk_k.shape[1:3]
  dt = compute_dtype(q)
  sel = select_blocks(gate, allowed, always, k, share, h)
  s = block_scores(q, blk_k, scale, dt, always, None if q_far is None else (q_far, blk_k_far))
  valid = blk_mask[:, None, None]
  s = jnp.where(valid, s, NEG_INF)
  lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
  mask = sel[..., None] & valid
  e = jnp.where(mask, jnp.broadcast_to(gate.astype(dt), (b, t, h, n))[..., None] + s - lse, NEG_INF)
  row_max = jnp.max(e, axis=(-2, -1))
  if k_loc is not None:
    s_loc = jnp.einsum("bthd,bshd->bths", q.astype(dt), k_loc.astype(dt)) * scale
    mask_loc = m_loc[:, :, None, :]
    s_loc = jnp.where(mask_loc, s_loc, NEG_INF)
    row_max = jnp.maximum(row_max, jnp.max(s_loc, axis=-1))
  row_max = jax.lax.stop_gradient(row_max)
  p = jnp.where(mask, jnp.exp(e - row_max[..., None, None]), 0.0)
  denom = jnp.sum(p, axis=(-2, -1))
  o = jnp.einsum("bthnc,bnchd->bthd", p, blk_v.astype(dt))
  if k_loc is not None:
    p_loc = jnp.where(mask_loc, jnp.exp(s_loc - row_max[..., None]), 0.0)
    denom = denom + jnp.sum(p_loc, axis=-1)
    o = o + jnp.einsum("bths,bshd->bthd", p_loc, v_loc.astype(dt))
  nonempty = denom > 0
  o = o / jnp.where(nonempty, denom, 1.0)[..., None]
  return jnp.where(nonempty[..., None], o, 0.0).astype(q.dtype)


def block_retrieval_attention_xla(q, blk_k, blk_v, gate, allowed, *, always=None, k=None,
                                  share="token_head", local=None, blk_mask=None, scale=None,
                                  chunk_size=DEFAULT_CHUNK, far=None):
  b, t, h, d = q.shape
  n, c = blk_k.shape[1:3]
  scale = d ** -0.5 if scale is None else scale
  blk_mask = jnp.ones((b, n, c), bool) if blk_mask is None else blk_mask
  always = jnp.zeros_like(allowed) if always is None else always
  if local is None:
    k_loc = v_loc = None
    m_loc = jnp.zeros((b, t, 0), bool)
  else:
    k_loc, v_loc, m_loc = local

  q_far, blk_k_far = (None, None) if far is None else far

  def body(xs):
    q_, g_, a_, al_, ml_, qf_ = xs
    return _tile(q_, g_, a_, al_, ml_ if k_loc is not None else None, qf_, blk_k, blk_v, blk_mask,
                 k_loc, v_loc, blk_k_far, k=k, share=share, scale=scale)

  tq = max(1, min(chunk_size, t))
  if tq == t:
    return body((q, gate, allowed, always, m_loc, q_far))
  nt = pl.cdiv(t, tq)
  pad = nt * tq - t

  def tiles(x):  # [B, T, ...] -> [nt, B, tq, ...], padding with zeros/False (empty rows)
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(b, nt, tq, *x.shape[2:]), 0, 1)

  xs = tuple(None if x is None else tiles(x) for x in (q, gate, allowed, always, m_loc, q_far))
  o = jax.lax.map(jax.checkpoint(body), xs)  # [nt, B, tq, H, dv]
  o = jnp.swapaxes(o, 0, 1).reshape(b, nt * tq, *o.shape[3:])
  return o[:, :t]
