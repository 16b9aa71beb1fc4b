"""Miras memories: Moneta, Yaad, Memora (Behrouz et al., "It's All Connected", arXiv 2504.13173 §5).

The Titans memory engine (`pallas_kernels.titans_memory`: one token loop, one chunked form) with
other pluggable pieces (`titans_memory.rules.MemoryRule`): an attentional bias and a retention over
the Titans MLP memory, plain GD (no momentum), chunked with gradients at the chunk base
(docs/architectures/miras.md; see `reference.py` for the equations):

    Moneta: bias="lp", p=3, retention="lq", q_norm=4      (Eq. 24-25, rescaled mirror map [ours])
    Yaad:   bias="huber", retention="l2"                  (Eq. 26)
    Memora: bias="l2", retention="kl"                     (Eq. 21, 27; lag_token=True)

Implementations (docs/design.md): `reference` (token lax.scan, the oracle) and `xla` (chunked; the
default on every backend: no Pallas kernel yet), i.e. the engine's `reference.memory_reference` and
`xla.memory_xla` with a Miras rule (`reference.miras_rule`). The chunked form takes every inner
gradient of a chunk at W_base = phi(X_0) (Miras §5.4), so the state is the linear recurrence
X_t = beta_t X_0 - sum_{i<=t} G[t, i] g_i r_i^T (the eta = 0 form of Titans v1 §3.2); inside a
chunk the reads use the linearised weights W_t = beta_t phi(X_0) - sum_i G[t, i] g_i r_i^T in the
dual form, and the token that ends a chunk reads phi(X_t) (`exact_read=True` reads phi(X_t) at
every token: a check, ~10x the cost). Memora's lag token steps token 0 of each chunk at X_0 and
takes the other tokens' gradients at X_1. See `titans_memory.xla` for padding, the phase shift,
checkpointing and precision.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._common import compute_dtype
from pallas_kernels._dispatch import dispatch
from pallas_kernels.miras_memory.reference import STATE_KEY, miras_rule
from pallas_kernels.titans_memory import (
  broadcast_initial,
  check_resets,
  check_sequences,
  check_state_and_gates,
)
from pallas_kernels.titans_memory.engine import MemoryInputs, MemoryParams, MemoryState
from pallas_kernels.titans_memory.reference import memory_reference
from pallas_kernels.titans_memory.rules import BIASES, RETENTIONS, MemoryRule
from pallas_kernels.titans_memory.xla import memory_xla

__all__ = ["miras_memory", "init_miras_state", "miras_weights", "MODELS", "IMPLEMENTATIONS",
           "STATE_KEY"]

# The engine's paths (`titans_memory.IMPLEMENTATIONS`); the Titans kernel does not run Miras rules.
IMPLEMENTATIONS = {"reference": memory_reference, "xla": memory_xla}

# The paper's three models as (bias, retention) pairs; Memora also takes lag_token=True.
MODELS = {"moneta": ("lp", "lq"), "yaad": ("huber", "l2"), "memora": ("l2", "kl")}


def init_miras_state(x0, batch_size: int, retention: str = "l2"):
  """The state at the start of a stream: the (learned) initial state x0 broadcast over the batch.

  Args:
    x0: tuple of per-layer initial states [H, out, in]: W_0 (l2), the dual A_0 (lq) or the logits
      Z_0 (kl); shapes as `titans_memory.init_memory_state`.
    batch_size: B. retention: "l2" | "lq" | "kl" (names the state key "w" | "a" | "z").
  Returns: {key: tuple of [B, H, out, in], "base": the same tuple, "base_decay": [B, H] ones (the
    retention product since the base), "phase": int32 [B] zeros}; float32 (float64 for float64 x0).
  """
  if retention not in STATE_KEY:
    raise ValueError(f"init_miras_state: unknown retention {retention!r}; choose one of {RETENTIONS}")
  x = broadcast_initial("init_miras_state", "x0", x0, batch_size)
  return {STATE_KEY[retention]: x, "base": x, "base_decay": jnp.ones(x[0].shape[:2], x[0].dtype),
          "phase": jnp.zeros((batch_size,), jnp.int32)}


def miras_weights(state, retention: str, *, q_norm=4.0, kl_scale_HL=None, exact_read=False):
  """The weights a read of `state` sees (tuple of [B, H, out, in]), e.g. for `memory_apply`:
  phi(X) at a chunk end, the linearised weights mid-chunk (`rules.MemoryRule.read_weights`)."""
  xs = tuple(state[STATE_KEY[retention]])
  if kl_scale_HL is None:
    kl_scale_HL = jnp.ones((xs[0].shape[1], len(xs)), xs[0].dtype)
  rule = MemoryRule(retention=retention, q_norm=q_norm, exact_read=exact_read)
  return rule.read_weights(xs, tuple(state["base"]), state["base_decay"], kl_scale_HL[None])


def _check(q, k, v, theta, a, delta, ln_scale, ln_bias, kl_scale, state, bias, retention,
           chunk_size, lengths, resets, reset_state):
  name = "miras_memory"
  if bias not in BIASES:
    raise ValueError(f"{name}: unknown bias {bias!r}; choose one of {BIASES}")
  if retention not in STATE_KEY:
    raise ValueError(f"{name}: unknown retention {retention!r}; choose one of {RETENTIONS}")
  B, T, H, D = check_sequences(name, q, k, v, chunk_size)
  key = STATE_KEY[retention]
  if not isinstance(state, dict) or set(state) != {key, "base", "base_decay", "phase"}:
    raise ValueError(f"{name}: with retention={retention!r} state must be a dict with keys "
                     f"{key}, base, base_decay, phase (see init_miras_state), got "
                     f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
  L = check_state_and_gates(name, state, key, ("base",), theta, {"a": a, "delta": delta},
                            ln_scale, ln_bias, lengths, (B, T, H, D))
  if state["base_decay"].shape != (B, H):
    raise ValueError(f"{name}: state['base_decay'] must be [B, H] = {(B, H)}, got "
                     f"{state['base_decay'].shape}")
  if kl_scale.shape != (H, L):
    raise ValueError(f"{name}: kl_scale must be [H, L] = {(H, L)}, got {kl_scale.shape}")
  check_resets(name, resets, reset_state, state, (B, T))


def miras_memory(q_BTHD, k_BTHD, v_BTHD, theta_BTHL, a_BTH, delta_BTH, ln_scale_HD, ln_bias_HD, *,
                 state, bias="l2", p=3.0, retention="l2", q_norm=4.0, kl_scale_HL=None,
                 lag_token=False, exact_read=False, chunk_size=16, lengths=None, resets_BT=None,
                 reset_state=None, assume_aligned=False, implementation=None, interpret=False):
  """A Miras memory over a sequence: writes every token, reads after each write.

  Args:
    q_BTHD, k_BTHD: queries and keys (L2-normalised by the caller). v_BTHD: values.
    theta_BTHL: inner step size per token, head and memory layer (L = depth), >= 0.
    a_BTH: retention factor a_t in [0, 1] (Miras' alpha_t). delta_BTH: Huber threshold (> 0; used
      by bias="huber" only, pass anything otherwise).
    ln_scale_HD, ln_bias_HD: outer-loop LayerNorm affine of the MLP memory (unused at depth 1).
    state: {"w" | "a" | "z" (by retention): tuple of [B, H, out, in], "base": the gradient-base state
      of the chunk in progress, "phase": int32 [B]} from `init_miras_state` or a previous call; chunk
      boundaries are global, so any split of a stream gives the same outputs and final state.
    bias: "l2" | "lp" | "huber" | "dot"; p: the l_p exponent. retention: "l2" | "lq" | "kl";
      q_norm: the l_q exponent; kl_scale_HL: Memora's per-matrix scale c (default ones).
    lag_token: Memora's lag token (docs/architectures/miras.md): the first token of each chunk takes its own exact step
      (chunks of {1, b-1} tokens on the global grid).
    exact_read: read phi(X_t) at every token instead of at chunk ends only (a check; ~10x the
      cost of the chunked form). Irrelevant for retention "l2" (phi is the identity).
    chunk_size: b (part of the model). lengths: optional int [B] right-padding lengths.
    resets_BT, reset_state: packed documents, as in `titans_memory` (a Miras state at phase 0).
    assume_aligned: static promise that every row starts at phase 0 (skips the phase shift).
    implementation: None (xla), "reference" or "xla". interpret: dispatch parity (no Pallas path).
  Returns:
    o_BTHD in q's dtype and the state after the last real token (float32; float64 for float64).
  """
  key = STATE_KEY.get(retention)
  L = len(state[key]) if isinstance(state, dict) and key in state else 1
  H = q_BTHD.shape[2] if q_BTHD.ndim == 4 else 0
  if kl_scale_HL is None:
    kl_scale_HL = jnp.ones((H, L), compute_dtype(q_BTHD))
  _check(q_BTHD, k_BTHD, v_BTHD, theta_BTHL, a_BTH, delta_BTH, ln_scale_HD, ln_bias_HD,
         kl_scale_HL, state, bias, retention, chunk_size, lengths, resets_BT, reset_state)
  to_engine = lambda st: MemoryState(x=tuple(st[key]), s=None, base=tuple(st["base"]),
                                     phase=st["phase"], base_decay=st["base_decay"])
  rule = miras_rule(bias, float(p), retention, float(q_norm), bool(lag_token), bool(exact_read))
  inputs = MemoryInputs(q=q_BTHD, k=k_BTHD, v=v_BTHD, theta=theta_BTHL, a=a_BTH, delta=delta_BTH,
                        resets=resets_BT)
  o, out = dispatch("miras_memory", IMPLEMENTATIONS, implementation, interpret, rule, inputs,
                    MemoryParams(ln_scale_HD, ln_bias_HD, kl_scale_HL), to_engine(state),
                    chunk_size=chunk_size, lengths=lengths,
                    reset=None if reset_state is None else to_engine(reset_state),
                    assume_aligned=assume_aligned)
  return o, {key: out.x, "base": out.base, "base_decay": out.base_decay, "phase": out.phase}
