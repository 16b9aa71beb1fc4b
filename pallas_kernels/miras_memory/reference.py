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

Memora's "lag token" (`lag_token=True`; docs/architectures/miras.md): the first token of every
b-chunk takes its own exact step, i.e. the base also refreshes after it (chunks of sizes {1, b-1},
still global via `phase`).
"""
from __future__ import annotations

from pallas_kernels.titans_memory.rules import MemoryRule

STATE_KEY = {"l2": "w", "lq": "a", "kl": "z"}


def miras_rule(bias, p, retention, q_norm, lag_token, exact_read=False) -> MemoryRule:
  """The engine's rule for a Miras memory: the given pieces, no momentum."""
  return MemoryRule(bias=bias, p=p, retention=retention, q_norm=q_norm, momentum=False,
                    lag_token=lag_token, exact_read=exact_read)
