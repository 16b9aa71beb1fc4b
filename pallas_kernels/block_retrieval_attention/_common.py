"""Input checks and block selection shared by the block-retrieval attention implementations."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import compute_dtype

# Finite "minus infinity": a masked logit must stay finite so that fully masked blocks (empty LSE)
# and fully masked rows give finite values and gradients, which are then zeroed by the masks.
NEG_INF = -1e30

SHARE_MODES = ("token_head", "token")


def check_inputs(q, blk_k, blk_v, gate, allowed, always, k, share, local, blk_mask,
                 far=None):
  if q.ndim != 4 or blk_k.ndim != 5 or blk_v.ndim != 5:
    raise ValueError(f"block_retrieval_attention: q must be [B,Tq,H,d] and blk_k/blk_v [B,N,C,H,d]; "
                     f"got q{q.shape} blk_k{blk_k.shape} blk_v{blk_v.shape}")
  b, t, h, d = q.shape
  _, n, c, hk, dk = blk_k.shape
  if blk_k.shape[0] != b or (hk, dk) != (h, d) or blk_v.shape[:4] != blk_k.shape[:4]:
    raise ValueError(f"block_retrieval_attention: blk_k{blk_k.shape} / blk_v{blk_v.shape} do not "
                     f"match q{q.shape}")
  if gate.shape[:2] != (b, t) or gate.shape[3:] != (n,) or gate.shape[2] not in (1, h):
    raise ValueError(f"block_retrieval_attention: gate must be [B,Tq,Hg,N] with Hg in (1, H={h}), "
                     f"got {gate.shape}")
  for name, m in (("allowed", allowed), ("always", always)):
    if m is not None and m.shape != (b, t, n):
      raise ValueError(f"block_retrieval_attention: {name} must be bool [B,Tq,N]={(b, t, n)}, "
                       f"got {m.shape}")
  if k is not None and k < 1:
    raise ValueError(f"block_retrieval_attention: k must be >= 1 or None (all), got {k}")
  if share not in SHARE_MODES:
    raise NotImplementedError(
        f"block_retrieval_attention: share={share!r} is not implemented; choose one of "
        f"{SHARE_MODES} ('head' shares over the tokens of a call, which is not causal; 'tile', one "
        "selection per query tile, is not implemented: the Pallas kernels take per-query "
        "selections and skip the blocks no query of a tile selected)")
  if blk_mask is not None and blk_mask.shape != (b, n, c):
    raise ValueError(f"block_retrieval_attention: blk_mask must be bool [B,N,C]={(b, n, c)}, "
                     f"got {blk_mask.shape}")
  if far is not None and (len(far) != 2 or far[0].shape != q.shape or far[1].shape != blk_k.shape):
    raise ValueError(f"block_retrieval_attention: far=(q_far, blk_k_far) must match q{q.shape} and "
                     f"blk_k{blk_k.shape}, got {tuple(getattr(a, 'shape', a) for a in far)}")
  if local is not None:
    k_loc, v_loc, m_loc = local
    s = k_loc.shape[1]
    if k_loc.shape != (b, s, h, d) or v_loc.shape[:3] != (b, s, h) or m_loc.shape != (b, t, s):
      raise ValueError(f"block_retrieval_attention: local=(k [B,S,H,d], v [B,S,H,dv], mask "
                       f"[B,Tq,S]) got {k_loc.shape}, {v_loc.shape}, {m_loc.shape}")


def check_no_far(far):
  """The Pallas kernels score every block with one query; `far` falls back to xla."""
  if far is not None:
    raise NotImplementedError("block_retrieval_attention: the Pallas kernels do not take far= "
                              "(separate query and keys for the non-always blocks); use "
                              "implementation='xla' or None")


def block_scores(q_BTHD, blk_k_BNCHD, scale, dt, always_BTN=None, far=None):
  """s [B, Tq, H, N, C] = scale * q_i . k_j; with far=(q_far, blk_k_far) the blocks outside
  `always` are scored as q_far_i . k_far_j instead."""
  s = jnp.einsum("bthd,bnchd->bthnc", q_BTHD.astype(dt), blk_k_BNCHD.astype(dt)) * scale
  if far is None:
    return s
  s_far = jnp.einsum("bthd,bnchd->bthnc", far[0].astype(dt), far[1].astype(dt)) * scale
  if always_BTN is None:
    return s_far
  return jnp.where(always_BTN[:, :, None, :, None], s, s_far)


def select_blocks(gate_BTGN, allowed_BTN, always_BTN, k, share, num_heads):
  """bool [B, Tq, H, N]: the blocks each (query, head) reads.

  S_i = top-k of the allowed blocks by gate (`token_head`), or by the max over heads of the
  normalised block probabilities softmax_b(gate) (`token`: one selection shared by the heads, the
  original `max_over_heads`), plus the `always` blocks, which do not count towards k. Ties go to
  the lower block index (`lax.top_k` is stable). k=None selects every allowed block.
  The selection is discrete: no gradient flows through it.
  """
  b, t, g, n = gate_BTGN.shape
  allowed = allowed_BTN[:, :, None, :]
  if k is None or k >= n:
    sel = jnp.broadcast_to(allowed, (b, t, 1, n))
  else:
    gate = jax.lax.stop_gradient(gate_BTGN).astype(compute_dtype(gate_BTGN))
    if share == "token" and g > 1:
      p = jax.nn.softmax(jnp.where(allowed, gate, NEG_INF), axis=-1)
      score = jnp.max(p, axis=2, keepdims=True)
      score = jnp.where(allowed, score, -1.0)
    else:
      score = jnp.where(allowed, gate, -jnp.inf)
    _, idx = jax.lax.top_k(score, k)  # [B, Tq, G', k]
    hit = jnp.any(idx[..., :, None] == jnp.arange(n, dtype=idx.dtype), axis=-2)
    sel = hit & allowed
  if always_BTN is not None:
    sel = sel | always_BTN[:, :, None, :]
  return jnp.broadcast_to(sel, (b, t, num_heads, n))
