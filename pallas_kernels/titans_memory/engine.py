"""Typed inputs of the memory engine, and the per-chunk read and carry shared by its chunked paths.

The engine (`reference.memory_reference`, `xla.memory_xla`, `pallas_gpu.memory_pallas_gpu`) takes a
`rules.MemoryRule` and four typed groups: the per-token streams (`MemoryInputs`), the outer-loop
constants (`MemoryParams`), the state carried between calls (`MemoryState`) and, for packed
documents, the state a document starts from (another `MemoryState`). The op modules
(`titans_memory`, `miras_memory`) build them from their public arguments.

Inside the chunked form one chunk of one (batch row, head) is a `ChunkTokens` and a `ChunkCarry`;
`read_and_carry` is the chunk's dual-form read and chunk-end state, written once over a small set
of dot/activation primitives (`DotOps`) so that the XLA path (einsum, `jax.nn.gelu`) and the Pallas
kernel (Triton-lowerable 2-D dots, a polynomial erf) run the same per-chunk forward math.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax


class MemoryInputs(NamedTuple):
  """Per-token streams of one call, [B, T, ...]."""
  q: jax.Array                      # [B, T, H, D] queries (L2-normalised by the layer)
  k: jax.Array                      # [B, T, H, D] keys (L2-normalised by the layer)
  v: jax.Array                      # [B, T, H, D] values
  theta: jax.Array                  # [B, T, H, L] inner step size per memory layer, >= 0
  a: jax.Array                      # [B, T, H] linear retention factor in [0, 1]
  eta: jax.Array | None = None      # [B, T, H] momentum coefficient (None: no momentum)
  delta: jax.Array | None = None    # [B, T, H] Huber threshold (read by bias "huber" only)
  resets: jax.Array | None = None   # [B, T] bool: a packed document starts at this token


class MemoryParams(NamedTuple):
  """Outer-loop constants of the memory, per head (shared by the batch rows)."""
  ln_scale: jax.Array               # [H, D] LayerNorm affine of the MLP memory (unused at depth 1)
  ln_bias: jax.Array                # [H, D]
  kl_scale: jax.Array | None = None  # [H, L] the "kl" retention's scale c (None otherwise)


class MemoryState(NamedTuple):
  """The engine's state between calls. Per-layer fields are tuples of [B, H, out, in]."""
  x: tuple                          # the state X: weights W, the dual A ("lq") or logits Z ("kl")
  s: tuple | None                   # momentum S (None without momentum)
  base: tuple                       # the gradient-base state of the chunk in progress
  phase: jax.Array                  # [B] int32: tokens of the current chunk already consumed
  base_decay: jax.Array | None = None  # [B, H] retention product since the base (None: ones)


class ChunkTokens(NamedTuple):
  """One chunk of n tokens of one (batch row, head) in the chunked form (batched by vmap)."""
  q: jax.Array                      # [n, D]
  k: jax.Array                      # [n, D]
  v: jax.Array                      # [n, D]
  theta: jax.Array                  # [n, L]
  a: jax.Array                      # [n]
  eta: jax.Array | None             # [n] or None (no momentum)
  delta: jax.Array | None           # [n] or None
  m: jax.Array                      # [n] 1 on real tokens, 0 on padding (per row: heads share it)
  q_prev: jax.Array | None = None   # [D] the previous chunk's last query (linearised reads only)


class ChunkCarry(NamedTuple):
  """What a chunk starts from. Per-layer fields are tuples of [out, in]."""
  x: tuple                          # X_0, the chunk's starting state
  s: tuple | None                   # S_0, the momentum (None without momentum)
  xb: tuple                         # X_base, where the inner gradients are taken (phi(X_base))
  pb: jax.Array                     # [] retention product from X_base to the chunk start


class ChunkOut(NamedTuple):
  """What a chunk returns (batched like its inputs)."""
  y: jax.Array                      # [n, D] the reads
  x: tuple                          # X_n
  s: tuple | None                   # S_n
  base: tuple                       # the gradient base of tokens 1..n-1 (lag token: X_1)
  since_base: jax.Array             # [] retention product since that base at the last token
  y_prev: jax.Array | None = None   # [D] the previous chunk's last read (linearised reads only)


class ChunkEnds(NamedTuple):
  """The decay factors of the chunk-end carry (scalars may be [] or [1, 1], columns [n, 1])."""
  beta_n: jax.Array                 # prod_j a_j over the chunk
  f_n: jax.Array | None             # (A diag(m) mom) at the last token (None without momentum)
  mom_n: jax.Array | None           # prod_j eta_j over the chunk (None without momentum)
  g_end: tuple                      # per layer [n, 1]: G^(l)[n-1, :] as a column
  s_end: tuple | None               # per layer [n, 1]: theta^(l) B[n-1, :] (None without momentum)


class DotOps(NamedTuple):
  """The primitives `read_and_carry` is written in; each chunked path supplies its own."""
  mm: Callable                      # a @ b
  mm_t: Callable                    # a @ b^T
  t_mm: Callable                    # a^T @ b
  gelu: Callable                    # exact (erf) GELU
  layer_norm: Callable              # (x, scale, bias) -> LayerNorm over the last axis
  val: Callable = lambda x: x       # reads an input where it is used (the kernel's lazy refs)
  gelu_grad: Callable | None = None  # GELU' (the hand-written VJP of `chunk_vjp` only)


def scaled(c, y):
  """c * y, or y when c is None: a per-layer factor of weights W = c * mat applied to a product with
  mat (`rules.MemoryRule.phi_factored`)."""
  return y if c is None else c * y


def read_and_carry(ops: DotOps, q, rs, gs, G, w0, coef, f, x, s, ends: ChunkEnds, ln_s, ln_b,
                   rs_read=None, w0_scale=None):
  """One chunk's dual-form read and chunk-end state (Titans v1 §3.2, Eq. 16-18), layer by layer.

  With the inner-gradient factors u_i^(l) = g_i^(l) r_i^(l)^T (rows of gs[l], rs[l]) and Z the
  layer's input rows (Z = q for the first layer):

      Z_out = diag(coef) Z W0^T + diag(f) Z S_0^T - (G^(l) o Z R^T) Gamma
      X_n = beta_n X_0 + f_n S_0 - Gamma^T diag(g_end) R,    S_n = mom_n S_0 - Gamma^T diag(s_end) R

  and y = Z_out (depth 1) or q + LN(Z_out) of the last layer (depth >= 2, GELU between layers).
  W0 is the read's start weights (X_0, or the linearised X_0 + P (phi(X_base) - X_base); `w0 is x`
  when they coincide), coef and f are [n, 1] columns; s None means no momentum (f, f_n, mom_n and
  s_end are then unused). q None skips the read (y None: the exact read happens elsewhere).
  rs_read: the factors the read sees, J(r_i) of a linearised read (rules.MemoryRule.read_map;
  default rs); the carry always uses rs. w0_scale: optional per-layer factors of W0 (None entries
  for none), applied after the matmul (`rules.MemoryRule.phi_factored`).
  Each layer's weights are read (`ops.val`) where they are used and carried right after the read,
  which keeps their live ranges short in the kernel. Returns (y, X_n, S_n or None).
  """
  L = len(x)
  z, x_new, s_new = q, [], []
  for l in range(L):
    x_l = ops.val(x[l])
    s_l = None if s is None else ops.val(s[l])
    if q is not None:
      w_l = x_l if w0 is x else ops.val(w0[l])
      z_out = scaled(None if w0_scale is None else w0_scale[l], coef) * ops.mm_t(z, w_l)
      if s is not None:
        z_out = z_out + f * ops.mm_t(z, s_l)
      r_read = rs[l] if rs_read is None else rs_read[l]
      z = z_out - ops.mm(ops.val(G[l]) * ops.mm_t(z, r_read), gs[l])
      if l < L - 1:
        z = ops.gelu(z)
    x_n = ops.val(ends.beta_n) * x_l
    if s is not None:
      x_n = x_n + ops.val(ends.f_n) * s_l
      s_new.append(ops.val(ends.mom_n) * s_l - ops.t_mm(gs[l] * ops.val(ends.s_end[l]), rs[l]))
    x_new.append(x_n - ops.t_mm(gs[l] * ops.val(ends.g_end[l]), rs[l]))
  if q is not None and L > 1:
    z = q + ops.layer_norm(z, ln_s, ln_b)
  return z, tuple(x_new), None if s is None else tuple(s_new)
