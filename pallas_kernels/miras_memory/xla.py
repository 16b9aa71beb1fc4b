"""Chunked Miras memories in plain JAX: the portable, autodiff-able default.

The chunked Miras rule (Behrouz et al., arXiv 2504.13173 §5.4; docs/architectures/miras.md, the
eta = 0 form of Titans v1 §3.2) is the Titans engine (`pallas_kernels.titans_memory.xla.memory_xla`) with a
Miras `MemoryRule` (no momentum): inside a chunk every inner gradient is taken at W_base = phi(X_0),
so the state is the linear recurrence X_t = beta_t X_0 - sum_{i<=t} G[t, i] g_i r_i^T. phi is applied
at chunk ends only (Miras §5.4): inside a chunk the reads use the linearised weights
W_t = beta_t phi(X_0) - sum_i G[t, i] g_i r_i^T in the dual form, exactly like the identity-phi
memory (Yaad), and the token that ends a chunk reads phi(X_t); `exact_read=True` materialises the
per-token states and reads phi(X_t) at every token (a check: ~10x the cost). Memora's lag token
steps token 0 of each chunk at X_0 and takes the other tokens' gradients at X_1. See the engine's
docstring for padding, the phase shift, checkpointing and precision.
"""
from __future__ import annotations

from pallas_kernels.miras_memory.reference import STATE_KEY, miras_reset, miras_rule
from pallas_kernels.titans_memory.xla import memory_xla


def miras_memory_xla(q, k, v, theta, a, delta, ln_scale, ln_bias, kl_scale, *, state, bias, p,
                     retention, q_norm, chunk_size, lengths, lag_token=False, exact_read=False,
                     resets=None, reset_state=None, assume_aligned=False):
  """Chunked form; same semantics as `miras_memory` (inputs already validated)."""
  key = STATE_KEY[retention]
  o, (x, _, base, phase, pb) = memory_xla(
      miras_rule(bias, p, retention, q_norm, lag_token, exact_read), q, k, v, theta, a, None, delta,
      ln_scale, ln_bias, kl_scale, x=state[key], s=None, base=state["base"], phase=state["phase"],
      base_decay=state["base_decay"], chunk_size=chunk_size, lengths=lengths, resets=resets,
      reset=miras_reset(reset_state, key), assume_aligned=assume_aligned)
  return o, {key: x, "base": base, "base_decay": pb, "phase": phase}
