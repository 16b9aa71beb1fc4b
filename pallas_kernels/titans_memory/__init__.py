"""Titans neural long-term memory (Behrouz et al., arXiv 2501.00663 v1, Eq. 13-15; chunked form §3.2).

Per token, head and memory layer, with gradients at the chunk-start weights (frozen base):

    S_t = eta_t S_{t-1} - theta_t grad_W 1/2 ||M_W(k_t) - v_t||^2 |_{W = W_base}
    W_t = a_t W_{t-1} + S_t,        y_t = M_{W_t}(q_t)   (read after write [ours])

M_W is linear (W x) at depth 1 and x + LN(W_L gelu(... gelu(W_1 x))) at depth L >= 2 (exact erf GELU,
LayerNorm eps 1e-5, affine outer-loop only). See docs/architectures/titans.md.

Implementations (docs/design.md): `reference` (token lax.scan, the oracle), `xla` (chunked dual
form, the portable default on every backend) and `pallas_gpu` (the same chunked engine with the
per-chunk step as a fused Pallas/Triton kernel: depth 1 or 2, power-of-two D, E and chunk >= 16,
<= 128 KiB of weights per head; see `pallas_gpu.py`). `None` runs `xla` on every backend for now:
the kernel is opt-in (`implementation="pallas_gpu"`, `_dispatch.resolve`'s opt_in) until a device
timing shows it faster [ours]. All three are the memory engine (`reference.memory_reference`,
`xla.memory_xla`, `pallas_gpu.memory_pallas_gpu`, typed inputs in `engine`) with the Titans rule
(`rules.TITANS`); `pallas_kernels.miras_memory` runs the same engine with other pluggable pieces
(attentional bias, retention, no momentum: `rules.MemoryRule`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import dispatch, lazy
from pallas_kernels.titans_memory.engine import MemoryInputs, MemoryParams, MemoryState
from pallas_kernels.titans_memory.reference import memory_apply, memory_reference
from pallas_kernels.titans_memory.rules import TITANS
from pallas_kernels.titans_memory.xla import memory_xla

__all__ = ["titans_memory", "init_memory_state", "memory_apply", "IMPLEMENTATIONS"]

# Each takes (rule, MemoryInputs, MemoryParams, MemoryState, *, chunk_size, lengths, reset,
# assume_aligned); the Pallas path also interpret.
IMPLEMENTATIONS = {
    "reference": memory_reference,
    "xla": memory_xla,
    "pallas_gpu": lazy("pallas_kernels.titans_memory.pallas_gpu", "memory_pallas_gpu"),
}
# Run only when asked for by name, until a device timing shows the kernel faster than xla.
OPT_IN = ("pallas_gpu",)


def _check_weights(name: str, ws, lead: tuple[int, ...]) -> None:
  """Per-layer weights [*lead, out, in] chaining D -> E*D -> ... -> D (one-line ValueErrors)."""
  if len(ws) == 0:
    raise ValueError(f"{name}: memory depth must be >= 1 (got an empty tuple of weights)")
  for l, w in enumerate(ws):
    if w.ndim != len(lead) + 2 or tuple(w.shape[:len(lead)]) != tuple(lead):
      raise ValueError(f"{name}: layer {l} weight must be [{', '.join(map(str, lead))}, out, in], "
                       f"got shape {w.shape}")
  d = ws[0].shape[-1]
  if ws[-1].shape[-2] != d:
    raise ValueError(f"{name}: the last layer must map back to D={d}, got shape {ws[-1].shape}")
  if len(ws) == 1 and ws[0].shape[-2] != d:
    raise ValueError(f"{name}: a linear memory must be square [D, D], got {ws[0].shape}")
  for l in range(1, len(ws)):
    if ws[l].shape[-1] != ws[l - 1].shape[-2]:
      raise ValueError(f"{name}: layer {l} input {ws[l].shape[-1]} != layer {l - 1} output "
                       f"{ws[l - 1].shape[-2]}")


def check_state_and_gates(name, state, key, twins, theta, gates, ln_scale, ln_bias, lengths,
                          shape_BTHD) -> int:
  """Shared by the memory ops (Titans, Miras): the weight tuple state[key], its same-shaped
  companions state[twin], phase [B], theta [B,T,H,L], per-head gates [B,T,H], LN affine [H,D] and
  lengths [B]; one-line ValueErrors. Returns the memory depth L."""
  B, T, H, D = shape_BTHD
  ws = tuple(state[key])
  _check_weights(name, ws, (B, H))
  if ws[0].shape[-1] != D:
    raise ValueError(f"{name}: memory width {ws[0].shape[-1]} != head dim D={D}")
  for twin in twins:
    if tuple(x.shape for x in state[twin]) != tuple(x.shape for x in ws):
      raise ValueError(f"{name}: state[{twin!r}] shapes {[x.shape for x in state[twin]]} != "
                       f"state[{key!r}] shapes {[x.shape for x in ws]}")
  if state["phase"].shape != (B,):
    raise ValueError(f"{name}: state['phase'] must be [B] = ({B},), got {state['phase'].shape}")
  L = len(ws)
  if theta.shape != (B, T, H, L):
    raise ValueError(f"{name}: theta must be [B, T, H, L] = {(B, T, H, L)}, got {theta.shape}")
  for n, x in gates.items():
    if x.shape != (B, T, H):
      raise ValueError(f"{name}: {n} must be [B, T, H] = {(B, T, H)}, got {x.shape}")
  for n, x in (("ln_scale", ln_scale), ("ln_bias", ln_bias)):
    if x.shape != (H, D):
      raise ValueError(f"{name}: {n} must be [H, D] = {(H, D)}, got {x.shape}")
  if lengths is not None and lengths.shape != (B,):
    raise ValueError(f"{name}: lengths must be [B] = ({B},), got {lengths.shape}")
  return L


def broadcast_initial(name: str, arg: str, x0, batch_size: int):
  """Per-layer initial states x0 [H, out, in] (the argument `arg` of `name`) -> tuple of
  [B, H, out, in], float32 (float64 for float64 x0); shared by the memory ops' init functions."""
  x0 = tuple(x0)
  if len(x0) == 0:
    raise ValueError(f"{name}: memory depth must be >= 1 (got an empty {arg})")
  _check_weights(name, x0, (x0[0].shape[0],))
  dt = jnp.float64 if any(w.dtype == jnp.float64 for w in x0) else jnp.float32
  return tuple(jnp.broadcast_to(w.astype(dt), (batch_size,) + w.shape) for w in x0)


def init_memory_state(w0, batch_size: int):
  """The state at the start of a stream: w = w_base = w0 broadcast over the batch, s = 0, phase 0.

  Args:
    w0: tuple of per-layer (learned) initial weights [H, out, in]: ([H, D, D],) for the linear memory,
      ([H, E*D, D], [H, E*D, E*D]..., [H, D, E*D]) for an MLP memory.
    batch_size: B.
  Returns: {"w", "s", "w_base": tuples of [B, H, out, in] float32 (float64 for float64 w0),
    "phase": int32 [B]}.
  """
  w = broadcast_initial("init_memory_state", "w0", w0, batch_size)
  return {"w": w, "s": tuple(jnp.zeros_like(x) for x in w), "w_base": w,
          "phase": jnp.zeros((batch_size,), jnp.int32)}


def check_sequences(name, q, k, v, chunk_size) -> tuple[int, int, int, int]:
  """Shared by the memory ops: chunk_size and q, k, v [B, T, H, D]; returns (B, T, H, D)."""
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
  if q.ndim != 4:
    raise ValueError(f"{name}: q must be [B, T, H, D], got shape {q.shape}")
  B, T, H, D = q.shape
  if T < 1:
    raise ValueError(f"{name}: sequence length must be >= 1, got T={T}")
  for n, x in (("k", k), ("v", v)):
    if x.shape != q.shape:
      raise ValueError(f"{name}: {n} must have q's shape {q.shape}, got {x.shape}")
  return B, T, H, D


def check_resets(name, resets, reset_state, state, shape_BT) -> None:
  """resets [B, T] bool needs a reset_state shaped like state (one-line ValueErrors)."""
  if resets is None:
    return
  if resets.shape != tuple(shape_BT) or resets.dtype != jnp.bool_:
    raise ValueError(f"{name}: resets must be bool [B, T] = {tuple(shape_BT)}, got "
                     f"{resets.dtype} {resets.shape}")
  if (not isinstance(reset_state, dict) or set(reset_state) != set(state)
      or jax.tree.structure(reset_state) != jax.tree.structure(state)
      or any(a.shape != b.shape for a, b in zip(jax.tree.leaves(reset_state),
                                                 jax.tree.leaves(state)))):
    raise ValueError(f"{name}: resets need reset_state, a state shaped like `state` (the state "
                     "each document starts from, at phase 0)")


def check_inputs(q, k, v, theta, eta, log_a, ln_scale, ln_bias, state, chunk_size, lengths,
                 resets=None, reset_state=None):
  name = "titans_memory"
  shape = check_sequences(name, q, k, v, chunk_size)
  if not isinstance(state, dict) or set(state) != {"w", "s", "w_base", "phase"}:
    raise ValueError(f"{name}: state must be a dict with keys w, s, w_base, phase "
                     f"(see init_memory_state), got {type(state).__name__}")
  check_resets(name, resets, reset_state, state, shape[:2])
  check_state_and_gates(name, state, "w", ("s", "w_base"), theta, {"eta": eta, "log_a": log_a},
                        ln_scale, ln_bias, lengths, shape)


def titans_memory(q_BTHD, k_BTHD, v_BTHD, theta_BTHL, eta_BTH, log_a_BTH, ln_scale_HD, ln_bias_HD,
                  *, state, chunk_size=16, lengths=None, resets_BT=None, reset_state=None,
                  assume_aligned=False, implementation=None, interpret=False):
  """Titans memory over a sequence: writes every token, reads after each write.

  Args:
    q_BTHD, k_BTHD: queries and keys, already L2-normalised by the caller. v_BTHD: values.
    theta_BTHL: inner step size per token, head and memory layer (L = depth), >= 0.
    eta_BTH: momentum coefficient in [0, 1). log_a_BTH: log retention a_t = 1 - alpha_t, <= 0.
    ln_scale_HD, ln_bias_HD: outer-loop LayerNorm affine of the MLP memory (unused at depth 1).
    state: {"w", "s", "w_base": tuples of [B, H, out, in], "phase": int32 [B]} from
      `init_memory_state` or a previous call. `phase` counts the tokens of the current chunk already
      consumed; chunk boundaries are global positions, so any split of a stream into calls gives the
      same outputs and final state as one call.
    chunk_size: b, the frozen-base chunk (part of the model: keep it between training and decoding).
    lengths: optional int [B]; only the first lengths[b] tokens of row b are real (right padding
      [ours]): later tokens leave the state untouched and read the state at the last real token.
    resets_BT: optional bool [B, T], True at the first token of each packed document after the
      first: the state becomes `reset_state` (the state a document starts from, at phase 0, e.g.
      `init_memory_state`) before that token and the chunk grid restarts there. The reference
      takes resets anywhere; the chunked paths need them on chunk starts (`layers.packing` moves
      documents there) and return NaN otherwise.
    assume_aligned: static promise that every row starts at a chunk boundary (phase 0), e.g. a
      fresh training sequence; lets the chunked path skip the phase shift and its extra chunk.
    implementation: None (xla everywhere until the kernel is measured faster; module docstring),
      "reference", "xla" or "pallas_gpu" (raises NotImplementedError for what the kernel does not
      support: other dtypes than float32/bf16/f16, depth >= 3, D, E or chunk_size not a power of
      two >= 16, more than 128 KiB of float32 weights per head).
    interpret: run the Pallas kernel in interpret mode (how the CPU tests exercise it).
  Returns:
    o_BTHD in q's dtype, and the state after the last real token (float32; float64 for float64
    inputs) with w_base the gradient base of the chunk in progress (== w when phase == 0).
  """
  check_inputs(q_BTHD, k_BTHD, v_BTHD, theta_BTHL, eta_BTH, log_a_BTH, ln_scale_HD, ln_bias_HD,
               state, chunk_size, lengths, resets_BT, reset_state)
  inputs = MemoryInputs(q=q_BTHD, k=k_BTHD, v=v_BTHD, theta=theta_BTHL, a=jnp.exp(log_a_BTH),
                        eta=eta_BTH, resets=resets_BT)
  o, out = dispatch("titans_memory", IMPLEMENTATIONS, implementation, interpret, TITANS, inputs,
                    MemoryParams(ln_scale_HD, ln_bias_HD), _engine_state(state),
                    chunk_size=chunk_size, lengths=lengths,
                    reset=None if reset_state is None else _engine_state(reset_state),
                    assume_aligned=assume_aligned, opt_in=OPT_IN)
  return o, {"w": out.x, "s": out.s, "w_base": out.base, "phase": out.phase}


def _engine_state(state) -> MemoryState:
  """A Titans state dict -> the engine's MemoryState (base_decay unused: phi is the identity)."""
  return MemoryState(x=tuple(state["w"]), s=tuple(state["s"]), base=tuple(state["w_base"]),
                     phase=state["phase"])
