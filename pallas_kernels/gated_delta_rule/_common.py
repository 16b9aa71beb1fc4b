"""Shared pieces of the gated-delta-rule and (gated) linear-attention ops.

per-chunk math of the chunked WY/UT form (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025,
arXiv 2412.06464, §3.3). Step numbers and mask names (same, cin, tail) are those of
docs/architectures/gated_deltanet.md ("Chunked form", "Packed documents").

`chunk_step` is written on 2-D tiles with only ops that both Pallas lowerings accept (dot_general,
iota, where, exp, keepdims reductions; no value slicing, no cumsum), so the `xla` path (vmapped over
batch and heads, scanned over chunks) and the Pallas kernels (one tile per program) share it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import dot


def check_inputs(name: str, q, k, v, beta, g, initial_state, segment_ids, chunk_size,
                 *, needs_beta: bool) -> None:
  """One-line ValueErrors for bad shapes; shared by every implementation."""
  if q.ndim != 4:
    raise ValueError(f"{name}: q must be [B, T, H, K], got shape {q.shape}")
  B, T, H, K = q.shape
  if k.shape != q.shape:
    raise ValueError(f"{name}: k must have q's shape {q.shape}, got {k.shape}")
  if v.ndim != 4 or v.shape[:3] != (B, T, H):
    raise ValueError(f"{name}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {v.shape}")
  if needs_beta and (beta is None or beta.shape != (B, T, H)):
    raise ValueError(f"{name}: beta must be [B, T, H] = {(B, T, H)}, got "
                     f"{None if beta is None else beta.shape}")
  if needs_beta and g is None:
    raise ValueError(f"{name}: g (log decay) is required, shape [B, T, H] = {(B, T, H)}")
  if g is not None and g.shape != (B, T, H):
    raise ValueError(f"{name}: g must be [B, T, H] = {(B, T, H)}, got {g.shape}")
  if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
    raise ValueError(f"{name}: initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, "
                     f"got {initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != (B, T):
    raise ValueError(f"{name}: segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
  if T < 1:
    raise ValueError(f"{name}: sequence length must be >= 1, got T={T}")


def run_ids(segment_ids, B: int, T: int):
  """[B, T] int32 ids that increase by one at every change of segment id.

  The op resets where the id *changes*, so a reused id ([0, 0, 1, 0]) is a new segment; run ids make
  "same segment" an equality test the chunk masks can use.
  """
  if segment_ids is None:
    return jnp.zeros((B, T), jnp.int32)
  change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)


class Chunked(NamedTuple):
  """Padded, chunk-shaped inputs. Token arrays are [B, NT, C, H, ...]; per-token masks [B, NT, C]."""
  q: jax.Array       # [B, NT, C, H, K]
  k: jax.Array       # [B, NT, C, H, K]
  v: jax.Array       # [B, NT, C, H, V]
  beta: jax.Array    # [B, NT, C, H]
  G: jax.Array       # [B, NT, C, H] chunk-local cumsum of g
  seg: jax.Array     # [B, NT, C] run ids (float, compared for equality only)
  cin: jax.Array     # [B, NT, C] 1 where the token continues the incoming state's segment
  tail: jax.Array    # [B, NT, C] 1 where the token belongs to the chunk's last segment


def prepare_chunks(q, k, v, beta, g, segment_ids, chunk_size: int, dtype) -> Chunked:
  """Pads T to a multiple of the chunk with neutral tokens and builds the segment masks.

  Neutral padding: k = v = q = 0, beta = 0 and g = 0 leave the state untouched (no decay, no write),
  and their segment id repeats the last real token's so the masks of real tokens are unchanged.
  """
  B, T, H, _ = q.shape
  C = chunk_size
  NT = -(-T // C)
  pad = NT * C - T
  if beta is None:
    beta = jnp.ones((B, T, H), dtype)
  if g is None:
    g = jnp.zeros((B, T, H), dtype)

  def tok(x):
    x = x.astype(dtype)
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((B, NT, C) + x.shape[2:])

  seg, cin, tail = chunk_masks(segment_ids, B, T, C, dtype)
  gc = tok(g)
  return Chunked(q=tok(q), k=tok(k), v=tok(v), beta=tok(beta), G=jnp.cumsum(gc, axis=2),
                 seg=seg, cin=cin, tail=tail)


def chunk_masks(segment_ids, B: int, T: int, C: int, dtype):
  """Run ids, cin and tail segment masks, each [B, NT, C] in `dtype`, for T padded to NT * C."""
  NT = -(-T // C)
  runs = run_ids(segment_ids, B, T)
  if NT * C > T:
    runs = jnp.pad(runs, [(0, 0), (0, NT * C - T)], mode="edge")
  runs = runs.reshape(B, NT, C)
  # The incoming state belongs to the segment of the previous chunk's last token (chunk 0: token 0).
  prev_last = jnp.concatenate([runs[:, :1, 0], runs[:, :-1, -1]], axis=1)  # [B, NT]
  cin = (runs == prev_last[:, :, None]).astype(dtype)
  tail = (runs == runs[:, :, -1:]).astype(dtype)
  return runs.astype(dtype), cin, tail


def unit_lower_inverse(A, *, block: int = 16, precision=None):
  """(I + A)^-1 for strictly lower-triangular A [C, C], with matmuls and masks only.

  Blocked, as FLA's `solve_tril`, but without value slicing so it
  lowers in Pallas: forward substitution inside the diagonal `block`x`block` blocks (block-1 steps,
  one row of every block per step), then I + A = (I + A_d)(I + N) with N = D A_o strictly block-lower,
  so (I + A)^-1 = (I + N)^-1 D and (I + N)^-1 = (I - N)(I + N^2)(I + N^4)... (N^(C/block) = 0).
  [ours] We avoid the pure doubling product over A itself: A^32 of a chunk of repeated keys has
  binomial-size entries whose cancellation loses float32 precision; N has at most C/block factors.
  """
  C = A.shape[0]
  bs = block if (C > block and C % block == 0) else C
  row = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  # lax.div/rem, not // and %: indices are >= 0, and jnp's floor division lowers through `sign`,
  # which Mosaic cannot lower without a TPU attached.
  bs_ = jnp.int32(bs)
  in_diag = lax.div(row, bs_) == lax.div(col, bs_)
  eye = jnp.where(row == col, 1.0, 0.0).astype(A.dtype)
  A_d = jnp.where(in_diag, A, 0.0)
  # A loop, not an unrolled Python for: the body is traced once, which keeps compiles short.
  D = lax.fori_loop(
      1, bs,
      lambda r, D: jnp.where(lax.rem(row, bs_) == r, eye - dot(A_d, D, precision=precision), D),
      eye)
  nb = C // bs
  if nb == 1:
    return D
  N = dot(D, jnp.where(in_diag, 0.0, A), precision=precision)
  inv = eye - N
  power, span = N, 2
  while span < nb:
    power = dot(power, power, precision=precision)
    inv = dot(inv, eye + power, precision=precision)
    span *= 2
  return dot(inv, D, precision=precision)


def _chunk_gates(Gc, Gr, segc, segr, cin):
  """Index grids and the decay factors of one chunk (step 1, the `same` segment mask).

  Returns row, col [C, C] iotas; gamma [C, C] = same_ij * exp(G_i - G_j) for j <= i, else 0;
  last [C, 1] (the chunk's last token); G_last, cin_last [1, 1]; eG = exp(G) [C, 1].
  """
  C = Gc.shape[0]
  row = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  mask = (row >= col) & (segc == segr)
  # Mask the exponent before exp: G_i - G_j > 0 above the diagonal could overflow.
  gamma = jnp.where(mask, jnp.exp(jnp.where(mask, Gc - Gr, 0.0)), 0.0)
  last = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
  # Static element extraction does not lower in Triton: read the last row with a masked sum.
  G_last = jnp.sum(jnp.where(last, Gc, 0.0), axis=0, keepdims=True)        # [1, 1]
  cin_last = jnp.sum(jnp.where(last, cin, 0.0), axis=0, keepdims=True)     # [1, 1]
  return row, col, gamma, last, G_last, cin_last, jnp.exp(Gc)


def chunk_step(q, k, v, beta, Gc, Gr, segc, segr, cin, tail, S, *, scale: float, delta: bool,
               precision=None):
  """One chunk of the chunked gated delta rule (steps 1-8, segment masks) on 2-D tiles.

  Args (C tokens, one batch row and head; everything in the compute dtype):
    q, k [C, K]; v [C, V]; beta, Gc, segc, cin, tail [C, 1] (columns); Gr, segr [1, C] (rows of the
    same G and segment ids); S [K, V] the incoming state. Gc is the chunk-local cumsum of g.
    delta=False gives (gated) linear attention: V' = V, beta unused.
  Returns (o [C, V], S_next [K, V]).
  """
  row, col, gamma, _, G_last, cin_last, eG = _chunk_gates(Gc, Gr, segc, segr, cin)
  if delta:
    A = jnp.where(row > col, beta * dot(k, k, tb=True, precision=precision) * gamma, 0.0)
    Tm = unit_lower_inverse(A, precision=precision)
    W = dot(Tm, beta * eG * k, precision=precision)
    U = dot(Tm, beta * v, precision=precision)
    v_new = U - cin * dot(W, S, precision=precision)
  else:
    v_new = v
  o = scale * (cin * eG * dot(q, S, precision=precision)
               + dot(dot(q, k, tb=True, precision=precision) * gamma, v_new, precision=precision))
  k_tail = tail * jnp.exp(G_last - Gc) * k
  S_next = cin_last * jnp.exp(G_last) * S + dot(k_tail, v_new, ta=True, precision=precision)
  return o, S_next


def chunk_step_bwd(q, k, v, beta, Gc, Gr, segc, segr, cin, tail, S, do, dS_next, *, scale: float,
                   delta: bool, precision=None):
  """Backward of `chunk_step` (with the segment masks), hand-derived.

  Recomputes the chunk from its incoming state S, then, with P = scale (Q K^T) . Gamma,
  Q~ = diag(cin e^G) Q, K~ = diag(tail e^(G_last - G)) K, W~ = diag(cin) W:
    dV' = P^T dO + K~ dS_{n+1}
    dS_n = scale Q~^T dO + cin_last e^(G_last) dS_{n+1} - W~^T dV'               (reverse pass)
    dQ = scale diag(cin e^G) dO S^T + scale ((dO V'^T) . Gamma) K
    dW = -diag(cin) dV' S^T, dU = dV'; with X_w = diag(beta e^G) K, X_u = diag(beta) V:
      dX_w = T^T dW, dX_u = T^T dU, dT = dW X_w^T + dU X_u^T, dA = -strict_lower(T^T dT T^T),
    and dK, dbeta, dG collect every path through P, K~, A = strict_lower(diag(beta) K K^T . Gamma),
    X_w and X_u; every e^G factor feeds dG (dg = reverse cumsum of dG, done by the caller).

  Args: those of `chunk_step`, plus do [C, V] (d output) and dS_next [K, V] (d of the returned state).
    The map is linear in (do, dS_next) and V's columns never mix, so v, S, do, dS_next may be one
    block of value columns: dv and dS_n are then that block's, and dq, dk, dbeta, dG are partial sums
    over blocks (what the GPU kernel's V-split grid adds up).
  Returns (dq [C, K], dk [C, K], dv [C, V], dbeta [C, 1] (0 when delta=False), dG [C, 1],
  dS_n [K, V]).
  """
  dot_nn = functools.partial(dot, precision=precision)
  dot_nt = functools.partial(dot, tb=True, precision=precision)
  dot_tn = functools.partial(dot, ta=True, precision=precision)
  rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)      # [C, n] -> [C, 1]
  row, col, gamma, last, G_last, cin_last, eG = _chunk_gates(Gc, Gr, segc, segr, cin)
  decay_last = cin_last * jnp.exp(G_last)                  # [1, 1]
  k_tail = tail * jnp.exp(G_last - Gc) * k                  # K~
  # Recompute V' (the forward's chunk_step, steps 3-6).
  if delta:
    strict = row > col
    kk = dot_nt(k, k)
    A = jnp.where(strict, beta * kk * gamma, 0.0)
    Tm = unit_lower_inverse(A, precision=precision)
    X_w, X_u = beta * eG * k, beta * v
    W_cin = cin * dot_nn(Tm, X_w)
    v_new = dot_nn(Tm, X_u) - dot_nn(W_cin, S)
  else:
    v_new = v
  qk = dot_nt(q, k)
  qS = scale * cin * eG * dot_nn(q, S)                      # the inter-chunk output term
  # Reverse pass: dV' and the state cotangent entering this chunk.
  dv_new = scale * dot_tn(qk * gamma, do) + dot_nn(k_tail, dS_next)
  dS = scale * dot_tn(cin * eG * q, do) + decay_last * dS_next
  # Gradients through P = scale (Q K^T) . Gamma and the inter-chunk term.
  dP = dot_nt(do, v_new)                                     # [C, C]
  dQK = scale * dP * gamma
  dq = scale * cin * eG * dot_nt(do, S) + dot_nn(dQK, k)
  dk = dot_tn(dQK, q)
  dgamma = scale * dP * qk                                   # masked by gamma below
  dG = rowsum(do * qS)
  # Through K~ (its e^(G_last - G)) and the decayed carried state cin_last e^(G_last) S.
  dk_tail = dot_nt(v_new, dS_next)                           # [C, K]
  dk = dk + tail * jnp.exp(G_last - Gc) * dk_tail
  z = rowsum(dk_tail * k_tail)
  dG = dG - z
  dG_last = (jnp.sum(z, axis=0, keepdims=True)
             + decay_last * jnp.sum(rowsum(dS_next * S), axis=0, keepdims=True))   # [1, 1]
  if delta:
    dS = dS - dot_tn(W_cin, dv_new)
    dW = -cin * dot_nt(dv_new, S)                            # [C, K]
    dX_w, dX_u = dot_tn(Tm, dW), dot_tn(Tm, dv_new)
    dT = dot_nt(dW, X_w) + dot_nt(dv_new, X_u)
    dA = jnp.where(strict, -dot_nt(dot_tn(Tm, dT), Tm), 0.0)
    dkk = dA * beta * gamma                                  # d(K K^T) through A
    dk = dk + dot_nn(dkk, k) + dot_tn(dkk, k) + beta * eG * dX_w
    dgamma = dgamma + dA * beta * kk
    dv = beta * dX_u
    dbeta = rowsum(dA * kk * gamma) + rowsum(dX_w * eG * k) + rowsum(dX_u * v)
    dG = dG + rowsum(dX_w * X_w)
  else:
    dv = dv_new
    dbeta = jnp.zeros_like(Gc)
  # Gamma_ij = exp(G_i - G_j): +dZ on row i, -dZ on column j. The column sums come out as a row
  # [1, C]; turn them into a column with a diagonal mask (no transpose in the kernels).
  Z = dgamma * gamma
  Z_colsum = jnp.sum(Z, axis=0, keepdims=True)               # [1, C]
  dG = dG + rowsum(Z) - rowsum(jnp.where(row == col, Z_colsum, 0.0))
  dG = dG + jnp.where(last, dG_last, 0.0)
  return dq, dk, dv, dbeta, dG, dS


def default_scale(scale, K: int) -> float:
  return float(K) ** -0.5 if scale is None else float(scale)


