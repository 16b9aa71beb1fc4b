"""Dense masked block-retrieval attention: the oracle (docs/architectures/landmark.md).

Every query scores every key of every block, in float32 (float64 for float64 inputs); block b's
logits are shifted by gate_b - LSE_{j in b} s_ij (the single-softmax form of the grouped softmax of
Mohtashami & Jaggi 2023, Eq. 1-4), unselected blocks and invalid keys are masked, and one NaN-safe
softmax runs over the blocks and the optional local keys. Memory is O(Tq * N * C) per head: for
tests and small shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import compute_dtype
from pallas_kernels.block_retrieval_attention._common import NEG_INF, block_scores, select_blocks


def block_retrieval_attention_reference(q, blk_k, blk_v, gate, allowed, *, always=None, k=None,
                                        share="token_head", local=None, blk_mask=None, scale=None,
                                        chunk_size=None, far=None):
  del chunk_size  # the reference is not tiled
  b, t, h, d = q.shape
  n, c = blk_k.shape[1:3]
  dt = compute_dtype(q)
  scale = d ** -0.5 if scale is None else scale
  sel_BTHN = select_blocks(gate, allowed, always, k, share, h)

  s_BTHNC = block_scores(q, blk_k, scale, dt, always, far)
  valid = (jnp.ones((b, n, c), bool) if blk_mask is None else blk_mask)[:, None, None]
  s_BTHNC = jnp.where(valid, s_BTHNC, NEG_INF)
  lse_BTHN1 = jax.nn.logsumexp(s_BTHNC, axis=-1, keepdims=True)
  gate_BTHN = jnp.broadcast_to(gate.astype(dt), (b, t, h, n))
  e_BTHNC = gate_BTHN[..., None] + s_BTHNC - lse_BTHN1
  m_BTHNC = sel_BTHN[..., None] & valid
  logits = [jnp.where(m_BTHNC, e_BTHNC, NEG_INF).reshape(b, t, h, n * c)]
  masks = [m_BTHNC.reshape(b, t, h, n * c)]
  if local is not None:
    k_loc, v_loc, m_loc = local
    s_loc = jnp.einsum("bthd,bshd->bths", q.astype(dt), k_loc.astype(dt)) * scale
    m_loc = jnp.broadcast_to(m_loc[:, :, None, :], s_loc.shape)
    logits.append(jnp.where(m_loc, s_loc, NEG_INF))
    masks.append(m_loc)
  logits, masks = jnp.concatenate(logits, -1), jnp.concatenate(masks, -1)
  p = jnp.where(masks, jax.nn.softmax(logits, axis=-1), 0.0)  # an empty row gives 0
  o = jnp.einsum("bthnc,bnchd->bthd", p[..., :n * c].reshape(b, t, h, n, c), blk_v.astype(dt))
  if local is not None:
    o = o + jnp.einsum("bths,bshd->bthd", p[..., n * c:], local[1].astype(dt))
  return o.astype(q.dtype)
