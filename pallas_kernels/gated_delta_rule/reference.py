"""Token-by-token oracle for the gated delta rule (and, with delta=False, gated linear attention).

Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025, arXiv 2412.06464, Eq. 10; see
docs/architectures/gated_deltanet.md):
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,    o_t = scale * S_t^T q_t
(post-update state). Segment resets: S is zeroed before token t when segment_ids[t] != segment_ids[t-1];
the first token of a call continues from `initial_state`. Math in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import compute_dtype
from pallas_kernels.gated_delta_rule import _common


def recurrence_reference(q, k, v, beta, g, *, scale, initial_state, segment_ids, delta: bool):
  """lax.scan over tokens. beta is ignored (and may be None) when delta=False; g may be None."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  dt = compute_dtype(q, k, v, beta, g, initial_state)
  scale = _common.default_scale(scale, K)
  S0 = (jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt))
  g = jnp.zeros((B, T, H), dt) if g is None else g
  beta = jnp.ones((B, T, H), dt) if beta is None else beta
  if segment_ids is None:
    reset = jnp.zeros((B, T), bool)
  else:
    reset = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)

  def step(S_BHKV, xs):
    q_BHK, k_BHK, v_BHV, b_BH, g_BH, r_B = xs
    S_BHKV = jnp.where(r_B[:, None, None, None], 0.0, S_BHKV)
    S_BHKV = jnp.exp(g_BH)[..., None, None] * S_BHKV
    if delta:
      pred_BHV = jnp.einsum("bhkv,bhk->bhv", S_BHKV, k_BHK)
      v_BHV = b_BH[..., None] * (v_BHV - pred_BHV)
    S_BHKV = S_BHKV + k_BHK[..., :, None] * v_BHV[..., None, :]
    o_BHV = scale * jnp.einsum("bhkv,bhk->bhv", S_BHKV, q_BHK)
    return S_BHKV, o_BHV

  xs = tuple(jnp.moveaxis(x.astype(dt), 1, 0) for x in (q, k, v, beta, g)) + (reset.T,)
  S_final, o_TBHV = lax.scan(step, S0, xs)
  return jnp.moveaxis(o_TBHV, 0, 1).astype(q.dtype), S_final


def gated_delta_rule_reference(q, k, v, beta, g, *, scale=None, initial_state=None,
                               segment_ids=None, chunk_size=None):
  """The oracle; `chunk_size` is accepted for signature parity and ignored."""
  del chunk_size
  return recurrence_reference(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                              segment_ids=segment_ids, delta=True)
