"""Chunked Titans neural memory in plain JAX: the portable, autodiff-able default.

Implements the chunked training form of Titans (Behrouz et al., arXiv 2501.00663 v1 §3.2, Eq. 16-18;
reference/titans_miras.md §3.2-3.3): inside a chunk of b tokens every inner gradient is taken at the
chunk-start weights W_base, so the momentum S and the weights W are linear recurrences in the
per-token gradients u_i = g_i r_i^T (one rank-1 factor pair per memory layer):

    W_t = beta_t W_0 + f_t S_0 - sum_{i<=t} G[t, i] g_i r_i^T,    S_n = mom_n S_0 - sum_i theta_i B[n, i] g_i r_i^T
    A[t, s] = prod_{s<j<=t} a_j,  B[t, s] = prod_{s<j<=t} eta_j,  beta_t = prod_{j<=t} a_j,
    mom_t = prod_{j<=t} eta_j,  f = A diag(m) mom,  G = A diag(m) B diag(theta^(l)).

The read y_t = M_{W_t}(q_t) is the dual form per layer (§3.2 step 3), with Z the layer's input rows:
    Z_out = diag(beta) Z W_0^T + diag(f) Z S_0^T - (G o Z R^T) Gamma,
and the chunk-end carry is step 4. Depth 1 is the closed form of §3.3 (E = K W_base^T - V).
W_0 (the chunk's starting weights) and W_base coincide except in the first chunk of a call that starts
mid-chunk, where the carried `w_base` is the gradient base.

Choices [ours]:
- m_t (the per-token mask, 0 on padding) enters W_t = a_t W_{t-1} + m_t S_t, hence the diag(m) above;
  padding tokens also get theta = 0, eta = 1, a = 1, which makes them exactly neutral even under
  momentum (titans_miras.md §10 "Short sequences").
- Split invariance (§9.6): the sequence is shifted right by the carried `phase` (a per-row
  dynamic slice of a padded copy, so shapes are static under jit) and right-padded to
  NC = ceil((T + b - 1) / b) chunks: one chunk more than an aligned call needs, the price of a traced
  phase.
- A is built in log space from cumsum(log a) with -inf written before exp (no inf * 0). The momentum
  matrices B and mom use a masked cumulative product instead, so eta = 0 (no momentum) never takes
  log 0 and needs no separate code path; cumprod's autodiff has no division, so gradients at eta = 0
  are exact.
- The chunk body is under `jax.checkpoint` and gets only (W, S, first-chunk flag, chunk inputs):
  backprop keeps chunk-boundary weights and momentum (2 |W| per chunk) plus the inputs, and
  recomputes the gradient factors and decay matrices of a chunk in the backward pass.
- Math in float32 (float64 for float64 inputs) with HIGHEST matmul precision; o in q's dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.titans_memory.reference import compute_dtype, gelu, layer_norm

_mm = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def decay_matrices(log_a_n, eta_n, m_n):
  """(beta [n], f [n], A diag(m) B [n, n], mom [n], B [n, n]) of one chunk (see module docstring)."""
  n = log_a_n.shape[0]
  idx = jnp.arange(n)
  lower = idx[:, None] >= idx[None, :]                       # [t, s]: s <= t
  cs = jnp.cumsum(log_a_n)
  A = jnp.exp(jnp.where(lower, cs[:, None] - cs[None, :], -jnp.inf))
  beta = jnp.exp(cs)
  # X[s, j] = eta_j for j > s else 1, so cumprod over j gives prod_{s<l<=j} eta_l without logs.
  X = jnp.where(idx[None, :] > idx[:, None], eta_n[None, :], 1.0)
  Bm = jnp.where(lower, jnp.cumprod(X, axis=1).T, 0.0)
  mom = jnp.cumprod(eta_n)
  Am = A * m_n[None, :]
  return beta, _mm("ts,s->t", Am, mom), _mm("tj,js->ts", Am, Bm), mom, Bm


def grad_factors(ws, ln_s, ln_b, k_nD, v_nD):
  """Per-row factors of the inner gradient at ws: u_i^(l) = g_i^(l) r_i^(l)^T for every layer l.

  One batched forward/backward of the chunk's keys: g^(l) is the gradient of sum_i loss_i w.r.t. a
  zero bias added to layer l's pre-activation (row i only sees its own loss), r^(l) the layer input.
  """
  L = len(ws)
  if L == 1:  # linear memory: v1 Eq. 16-18 closed form, E = K W^T - V
    return (k_nD,), (_mm("ni,oi->no", k_nD, ws[0]) - v_nD,)

  def loss(biases):
    h, rs = k_nD, []
    for l, w in enumerate(ws):
      rs.append(h)
      h = _mm("ni,oi->no", h, w) + biases[l]
      if l < L - 1:
        h = gelu(h)
    e = k_nD + layer_norm(h, ln_s, ln_b) - v_nD
    return 0.5 * jnp.sum(e * e), tuple(rs)

  zeros = tuple(jnp.zeros((k_nD.shape[0], w.shape[0]), k_nD.dtype) for w in ws)
  gs, rs = jax.grad(loss, has_aux=True)(zeros)
  return rs, gs


def chunk_step(w, s, wb, q, k, v, theta, eta, log_a, m, ln_s, ln_b):
  """One chunk of one (batch row, head): returns (y [n, D], W_n, S_n).

  w, s, wb: tuples of [out, in] (start weights, momentum, gradient base); q, k, v [n, D];
  theta [n, L]; eta, log_a, m [n]; ln_s, ln_b [D].
  """
  L = len(w)
  beta, f, AmB, mom, Bm = decay_matrices(log_a, eta, m)
  rs, gs = grad_factors(wb, ln_s, ln_b, k, v)
  z, w_new, s_new = q, [], []
  for l in range(L):
    G = AmB * theta[None, :, l]                              # lower triangular (exact zeros)
    z_out = (beta[:, None] * _mm("ni,oi->no", z, w[l]) + f[:, None] * _mm("ni,oi->no", z, s[l])
             - _mm("ts,so->to", G * _mm("ti,si->ts", z, rs[l]), gs[l]))
    z = gelu(z_out) if l < L - 1 else z_out
    w_new.append(beta[-1] * w[l] + f[-1] * s[l] - _mm("so,s,si->oi", gs[l], G[-1], rs[l]))
    s_new.append(mom[-1] * s[l] - _mm("so,s,si->oi", gs[l], theta[:, l] * Bm[-1], rs[l]))
  y = z if L == 1 else q + layer_norm(z, ln_s, ln_b)
  return y, tuple(w_new), tuple(s_new)


# heads share the row's mask; batch rows share the LayerNorm affine
_chunk_bh = jax.vmap(jax.vmap(chunk_step, in_axes=(0,) * 9 + (None, 0, 0)),
                     in_axes=(0,) * 10 + (None, None))


def titans_memory_xla(q, k, v, theta, eta, log_a, ln_scale, ln_bias, *, state, chunk_size=16,
                      lengths=None, assume_aligned=False):
  """Chunked form; same signature and semantics as `titans_memory` (inputs already validated).

  `assume_aligned=True` is the caller's promise that every row starts at a chunk boundary
  (phase 0, e.g. a fresh training sequence): the phase shift and its extra chunk are skipped.
  """
  B, T, H, D = q.shape
  b = chunk_size
  dt = compute_dtype(q, k, v, theta, eta, log_a, ln_scale, ln_bias, state["w"], state["s"],
                     state["w_base"])
  nc = -(-T // b) if assume_aligned else -(-(T + b - 1) // b)
  tp = nc * b
  phase0 = jnp.zeros((B,), jnp.int32) if assume_aligned else state["phase"].astype(jnp.int32)
  n_real = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  real = jnp.arange(T)[None, :] < n_real[:, None]            # [B, T]

  def shift(x, fill):
    """[B, T, ...] -> [B, tp, ...] with token j at position phase0 + j, `fill` elsewhere."""
    x = x.astype(dt)
    if assume_aligned:
      return jnp.pad(x, [(0, 0), (0, tp - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    ext = jnp.pad(x, [(0, 0), (b - 1, tp - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jax.vmap(lambda e, p: lax.dynamic_slice_in_dim(e, b - 1 - p, tp, 0))(ext, phase0)

  def chunks(x):
    """[B, tp, H, ...] -> [nc, B, H, b, ...]."""
    x = x.reshape((B, nc, b) + x.shape[2:])
    return jnp.moveaxis(x, (1, 3), (0, 2))

  xs = (chunks(shift(q, 0.0)), chunks(shift(k, 0.0)), chunks(shift(v, 0.0)),
        chunks(shift(jnp.where(real[..., None, None], theta, 0), 0.0)),
        chunks(shift(jnp.where(real[..., None], eta, 1), 1.0)),
        chunks(shift(jnp.where(real[..., None], log_a, 0), 0.0)),
        jnp.moveaxis(shift(real, 0.0).reshape(B, nc, b), 1, 0))
  ln_s, ln_b = ln_scale.astype(dt), ln_bias.astype(dt)
  w0 = tuple(x.astype(dt) for x in state["w"])
  s0 = tuple(x.astype(dt) for x in state["s"])
  wb0 = tuple(x.astype(dt) for x in state["w_base"])
  c_last = (phase0 + n_real - 1) // b                         # chunk of the last real token (-1: none)

  @jax.checkpoint
  def compute(w, s, first, xs_c):
    base = tuple(jnp.where(first, x0, x) for x0, x in zip(wb0, w))
    y, w_new, s_new = _chunk_bh(w, s, base, *xs_c, ln_s, ln_b)
    return y, w_new, s_new, base

  def body(carry, inp):
    w, s, sel = carry
    c, xs_c = inp
    y, w_new, s_new, base = compute(w, s, c == 0, xs_c)
    # A 0/1 blend instead of jnp.where: the backward then keeps a [B] flag per chunk, not a
    # predicate broadcast to |W|; with h in {0, 1} the blend is exact.
    h = (c == c_last).astype(dt)[:, None, None, None]
    sel = tuple(x * h + o * (1 - h) for x, o in zip(base, sel))
    return (w_new, s_new, sel), y

  # Short sequences (a few chunks: CPU-sized training, MAC segments, decode steps) are unrolled:
  # the while loop's per-iteration overhead dominates there.
  (w_end, s_end, sel), y = lax.scan(body, (w0, s0, wb0), (jnp.arange(nc), xs),
                                    unroll=nc if nc <= 4 else 1)
  y = jnp.moveaxis(y, (0, 2), (1, 3)).reshape(B, tp, H, D)    # [nc, B, H, b, D] -> [B, tp, H, D]
  if assume_aligned:
    o = y[:, :T]
  else:
    o = jax.vmap(lambda x, p: lax.dynamic_slice_in_dim(x, p, T, 0))(y, phase0)
  phase = (phase0 + n_real) % b
  refresh = ((phase == 0) & (n_real > 0))[:, None, None, None]
  w_base = tuple(jnp.where(refresh, x, o_) for x, o_ in zip(w_end, sel))
  return o.astype(q.dtype), {"w": w_end, "s": s_end, "w_base": w_base, "phase": phase}
