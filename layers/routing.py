"""Top-k routing and product-key retrieval (Lample et al. 2019, "Large Memory Layers with Product Keys",
arXiv:1907.05242 section 3.2; docs/architectures/peer.md).

`product_key_topk` is the exact top-k over the n_a * n_b implicit keys [c_a; c'_b] whose score is
q_a . keys_a[a] + q_b . keys_b[b], in three steps:

  1. (v_a, A) = topk(keys_a q_a, k) and (v_b, B) = topk(keys_b q_b, k);
  2. the k^2 candidate sums v_a[i] + v_b[j] with the row-major index A[i] * n_b + B[j];
  3. the top k of the candidates.

Exact because a global top-k pair (a, b) with a outside topk(keys_a q_a, k) would be beaten by the k
pairs (a', b) whose a' beat a: at most k - 1 pairs may beat it. Ties change indices, never scores.

`usage_stats` computes the expert-usage statistics (PEER Table 2: usage, unevenness, entropy).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def topk(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(values, indices) of the k largest entries over the last axis, values sorted descending."""
  if not 1 <= k <= x.shape[-1]:
    raise ValueError(f"topk: need 1 <= k <= {x.shape[-1]} (last axis), got k={k}")
  return jax.lax.top_k(x, k)


def product_key_topk(q_a: jax.Array, q_b: jax.Array, keys_a: jax.Array, keys_b: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k over the n_a * n_b product keys (docs/architectures/peer.md).

  Args:
    q_a: [..., d_a] first sub-query; q_b: [..., d_b] second sub-query.
    keys_a: [n_a, d_a] first sub-key set; keys_b: [n_b, d_b] second sub-key set.
    k: number of keys to return, 1 <= k <= n_a * n_b.

  Returns:
    scores [..., k] sorted descending (float32, or float64 for float64 inputs) and int32 indices
    [..., k] into the row-major grid, index = a * n_b + b.

  Each half keeps min(k, n) candidates, which is all that exactness needs; gradients reach the
  queries and keys through the selected scores only.
  """
  n_a, n_b = keys_a.shape[0], keys_b.shape[0]
  if not 1 <= k <= n_a * n_b:
    raise ValueError(f"product_key_topk: need 1 <= k <= n_a*n_b = {n_a * n_b}, got k={k}")
  dt = jnp.promote_types(jnp.result_type(q_a, keys_a, q_b, keys_b), jnp.float32)
  s_a = jnp.einsum("...d,nd->...n", q_a.astype(dt), keys_a.astype(dt))
  s_b = jnp.einsum("...d,nd->...n", q_b.astype(dt), keys_b.astype(dt))
  v_a, i_a = jax.lax.top_k(s_a, min(k, n_a))
  v_b, i_b = jax.lax.top_k(s_b, min(k, n_b))
  cand = v_a[..., :, None] + v_b[..., None, :]
  cand_idx = i_a[..., :, None] * n_b + i_b[..., None, :]
  lead = cand.shape[:-2]
  cand = cand.reshape(*lead, -1)
  cand_idx = cand_idx.reshape(*lead, -1)
  scores, pos = jax.lax.top_k(cand, k)
  return scores, jnp.take_along_axis(cand_idx, pos, axis=-1).astype(jnp.int32)


def usage_stats(indices: jax.Array, weights: jax.Array, num_experts: int) -> dict[str, jax.Array]:
  """Expert-usage statistics over a batch (PEER, He 2024, Table 2).

  z_i is the router mass accumulated on row i, normalised to sum 1 over rows:
    usage      = fraction of rows with z_i > 0 (the share of experts hit in the batch);
    entropy    = -sum_i z_i log z_i (natural log);
    unevenness = log N - entropy (the KL divergence to uniform usage).
  Never differentiated. `weights` should be non-negative (e.g. softmax gates); for signed scores pass
  their absolute values.
  """
  idx = jax.lax.stop_gradient(indices).reshape(-1)
  w = jax.lax.stop_gradient(weights).reshape(-1).astype(jnp.float32)
  mass = jnp.zeros((num_experts,), jnp.float32).at[idx].add(w)
  hit = jnp.zeros((num_experts,), jnp.float32).at[idx].add(1.0) > 0
  z = mass / jnp.maximum(mass.sum(), 1e-30)
  entropy = -jnp.sum(jnp.where(z > 0, z * jnp.log(jnp.where(z > 0, z, 1.0)), 0.0))
  return {"usage": jnp.mean(hit.astype(jnp.float32)), "entropy": entropy,
          "unevenness": math.log(num_experts) - entropy}
