"""Chunked Miras memories in plain JAX: the portable, autodiff-able default.

The chunked Miras rule (Behrouz et al., arXiv 2504.13173 §5.4; reference/titans_miras.md §7.3, the
eta = 0 form of §3.2) is the Titans engine (`pallas_kernels.titans_memory.xla.memory_xla`) with a
Miras `MemoryRule` (no momentum): inside a chunk every inner gradient is taken at W_base = phi(X_0),
so the state is the linear recurrence X_t = beta_t X_0 - sum_{i<=t} G[t, i] g_i r_i^T, and the read
is y_t = M_{phi(X_t)}(q_t) with the exact per-token phi [ours, §7.3]: the dual form for l2 retention
(Yaad), per-token states materialised within a chunk for lq (Moneta) and kl (Memora). Memora's lag
token steps token 0 of each chunk at X_0 and takes the other tokens' gradients at X_1. See the
engine's docstring for padding, the phase shift, checkpointing and precision.
"""
from __future__ import annotations

from pallas_kernels.miras_memory.reference import STATE_KEY, miras_rule
from pallas_kernels.titans_memory.xla import memory_xla


def miras_memory_xla(q, k, v, theta, a, delta, ln_scale, ln_bias, kl_scale, *, state, bias, p,
                     retention, q_norm, chunk_size, lengths, lag_token=False,
                     assume_aligned=False):
  """Chunked form; same semantics as `miras_memory` (inputs already validated)."""
  key = STATE_KEY[retention]
  o, (x, _, base, phase) = memory_xla(
      miras_rule(bias, p, retention, q_norm, lag_token), q, k, v, theta, a, None, delta, ln_scale,
      ln_bias, kl_scale, x=state[key], s=None, base=state["base"], phase=state["phase"],
      chunk_size=chunk_size, lengths=lengths, assume_aligned=assume_aligned)
  return o, {key: x, "base": base, "phase": phase}
