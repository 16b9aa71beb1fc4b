"""Token-by-token oracle for the Miras memories (Behrouz et al., "It's All Connected", arXiv 2504.13173).

Moneta (Eq. 24-25), Yaad (Eq. 26) and Memora (Eq. 21, 27) share the Titans MLP memory
M_W(x) = x + LN(W_2 gelu(W_1 x)), plain GD without momentum and decoupled step size theta / retention
factor a (docs/architectures/miras.md). Per token, head and memory layer l, with gradients at the
chunk-start state (Miras §5.4):

    e_t = M_{W_base}(k_t) - v_t,       W_base = phi(X_base)   (X_base: the state at the chunk start)
    g_t = attentional-bias output gradient of e_t;   u_t = backprop of g_t through M at W_base
    X_t = a_t X_{t-1} - theta_t^(l) u_t^(l)                  (the state X: W, the dual A, or logits Z)
    y_t = M_{W_t}(q_t)                                        (read after write)

with phi applied at chunk ends only (Miras §5.4): W_t = phi(X_t) for a token that ends a chunk and
the linearised W_t = X_t + P_t (phi(X_base) - X_base) inside a chunk (P_t: the product of the
retention factors since the base; `titans_memory.rules`); `exact_read=True` reads phi(X_t) always.

This is the Titans engine's token loop (`pallas_kernels.titans_memory.reference.memory_reference`)
with the pieces of `pallas_kernels.titans_memory.rules` (the biases g and retentions phi are listed
there) and no momentum. Chunk boundaries are global (`phase`), exactly as in `titans_memory`; tokens
at positions >= lengths[b] leave the state untouched and read the state at the last real token.

Memora's "lag token" (`lag_token=True`; docs/architectures/miras.md): the first token of every b-chunk takes its own exact
step, i.e. the base also refreshes after it (chunks of sizes {1, b-1}, still global via `phase`).
"""
from __future__ import annotations

from pallas_kernels.titans_memory.reference import memory_reference
from pallas_kernels.titans_memory.rules import MemoryRule

STATE_KEY = {"l2": "w", "lq": "a", "kl": "z"}


def miras_rule(bias, p, retention, q_norm, lag_token, exact_read=False) -> MemoryRule:
  return MemoryRule(bias=bias, p=p, retention=retention, q_norm=q_norm, momentum=False,
                    lag_token=lag_token, exact_read=exact_read)


def miras_memory_reference(q, k, v, theta, a, delta, ln_scale, ln_bias, kl_scale, *, state, bias,
                           p, retention, q_norm, chunk_size, lengths, lag_token=False,
                           exact_read=False, resets=None, reset_state=None):
  """The oracle: the engine's token loop with a Miras rule. Same semantics as `miras_memory`."""
  key = STATE_KEY[retention]
  o, (x, _, base, phase, pb) = memory_reference(
      miras_rule(bias, p, retention, q_norm, lag_token, exact_read), q, k, v, theta, a, None, delta,
      ln_scale, ln_bias, kl_scale, x=state[key], s=None, base=state["base"], phase=state["phase"],
      base_decay=state["base_decay"], chunk_size=chunk_size, lengths=lengths, resets=resets,
      reset=miras_reset(reset_state, key))
  return o, {key: x, "base": base, "base_decay": pb, "phase": phase}


def miras_reset(state, key):
  """A Miras state dict -> the engine's reset tuple (x, s, base, base_decay), or None."""
  return None if state is None else (state[key], None, state["base"], state["base_decay"])
