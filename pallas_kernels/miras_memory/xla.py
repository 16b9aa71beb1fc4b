"""Chunked Miras memories in plain JAX: the portable, autodiff-able default.

Implements the chunked Miras rule (Behrouz et al., arXiv 2504.13173 §5.4; reference/titans_miras.md
§7.3, the eta = 0 form of §3.2): inside a chunk of n <= b tokens every inner gradient is taken at
W_base = phi(X_0) (X_0: the state at the chunk start), so the state is a linear recurrence in the
per-token gradients u_i^(l) = g_i^(l) r_i^(l)^T:

    X_t = beta_t X_0 - sum_{i<=t} G[t, i] g_i r_i^T,   A[t, s] = prod_{s<j<=t} a_j,  beta_t = prod_{j<=t} a_j,
    G = A diag(m theta^(l))                           (m: 1 on real tokens, 0 on padding)

and the read is y_t = M_{phi(X_t)}(q_t) with the exact per-token phi [ours, §7.3].

Choices [ours]:
- One batched forward/backward of the chunk's keys at W_base gives the rank-1 factors (g_i, r_i) per
  layer. The per-token states X_t are then materialised for the whole chunk (transient n |W|, allowed
  by §7.3 and recomputed in the backward pass) and phi and the read are vmapped over tokens. For l2
  retention the dual form of §3.2 would avoid the materialisation; one code path for every variant
  was preferred here.
- Memora's lag token (`lag_token=True`, §7.3): token 0 of each chunk is stepped exactly at X_0 and
  the other tokens' gradients are taken at X_1 (a second batched backward per chunk).
- A is a masked cumulative product (no log), so a -> 0 is safe and its autodiff exact.
- Split invariance and `lengths`: the sequence is shifted right by the carried `phase` and padded
  to whole chunks (one extra chunk for a traced phase), exactly as `titans_memory`'s xla path;
  padding tokens get theta = 0 and a = 1 (neutral).
- The chunk body is under `jax.checkpoint`: backprop keeps chunk-boundary states only.
- Math in float32 (float64 for float64 inputs) with HIGHEST matmul precision; o in q's dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.miras_memory.reference import STATE_KEY, output_grad, phi
from pallas_kernels.titans_memory.reference import compute_dtype, gelu, layer_norm, mlp_apply

_mm = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def decay_matrix(a_n):
  """(A [n, n] lower triangular with A[t, s] = prod_{s<j<=t} a_j, beta [n] = cumprod(a))."""
  n = a_n.shape[0]
  idx = jnp.arange(n)
  X = jnp.where(idx[None, :] > idx[:, None], a_n[None, :], 1.0)   # X[s, j] = a_j for j > s
  A = jnp.where(idx[:, None] >= idx[None, :], jnp.cumprod(X, axis=1).T, 0.0)
  return A, jnp.cumprod(a_n)


def grad_factors(ws, ln_s, ln_b, k_nD, v_nD, delta_n, *, bias, p):
  """Per-row factors (r^(l), g^(l)) of u_i^(l) = g_i^(l) r_i^(l)^T at weights ws, for all n keys.

  g^(l) is the cotangent of a zero bias on layer l's pre-activation when the memory output gets the
  attentional bias' output gradient (row i only sees its own row).
  """
  L = len(ws)

  def forward(biases):
    h, rs = k_nD, []
    for l, w in enumerate(ws):
      rs.append(h)
      h = _mm("ni,oi->no", h, w) + biases[l]
      if l < L - 1:
        h = gelu(h)
    out = h if L == 1 else k_nD + layer_norm(h, ln_s, ln_b)
    return out, tuple(rs)

  zeros = tuple(jnp.zeros((k_nD.shape[0], w.shape[0]), k_nD.dtype) for w in ws)
  out, vjp, rs = jax.vjp(forward, zeros, has_aux=True)
  gs = vjp(output_grad(out - v_nD, v_nD, delta_n, bias, p))[0]
  return rs, gs


def chunk_step(x0, xb, q, k, v, theta, a, delta, keep_base, c_L, ln_s, ln_b, *, bias, p, retention,
               q_norm, lag):
  """One chunk of one (batch row, head): returns (y [n, D], X_n, the base of tokens 1..n-1).

  x0, xb: tuples of [out, in] (start state, gradient-base state); q, k, v [n, D]; theta [n, L];
  a, delta [n] (a = 1 and theta = 0 on padding); c_L [L]; ln_s, ln_b [D].
  lag (static): Memora's lag token, token 0 takes its own exact step at X_0 and tokens 1..n-1 take
  gradients at X_1; keep_base (bool) says token 0 is not real here (a call that starts mid-chunk),
  so tokens 1..n-1 keep the carried base xb.
  """
  A, beta = decay_matrix(a)
  rs, gs = grad_factors(phi(xb, retention, q_norm, c_L), ln_s, ln_b, k, v, delta, bias=bias, p=p)
  base = xb
  if lag and a.shape[0] > 1:
    # token 0 at X_0 (== xb whenever token 0 is real), then the rest at X_1
    x1 = tuple(a[0] * x0[l] - theta[0, l] * _mm("o,i->oi", gs[l][0], rs[l][0])
               for l in range(len(x0)))
    base = tuple(jnp.where(keep_base, b_, x_) for b_, x_ in zip(xb, x1))
    rs1, gs1 = grad_factors(phi(base, retention, q_norm, c_L), ln_s, ln_b, k, v, delta,
                            bias=bias, p=p)
    rs = tuple(jnp.concatenate([r0[:1], r1[1:]]) for r0, r1 in zip(rs, rs1))
    gs = tuple(jnp.concatenate([g0[:1], g1[1:]]) for g0, g1 in zip(gs, gs1))
  xs_t = tuple(beta[:, None, None] * x0[l][None]
               - _mm("ts,so,si->toi", A * theta[None, :, l], gs[l], rs[l]) for l in range(len(x0)))
  ws_t = phi(xs_t, retention, q_norm, c_L)                  # [n, out, in] per layer
  y = mlp_apply(ws_t, ln_s[None], ln_b[None], q[:, None, :])[:, 0]
  return y, tuple(x[-1] for x in xs_t), base


def miras_memory_xla(q, k, v, theta, a, delta, ln_scale, ln_bias, kl_scale, *, state, bias, p,
                     retention, q_norm, chunk_size, lengths, lag_token=False,
                     assume_aligned=False):
  """Chunked form; same semantics as `miras_memory` (inputs already validated)."""
  B, T, H, D = q.shape
  b = chunk_size
  key = STATE_KEY[retention]
  dt = compute_dtype(q, k, v, theta, a, delta, ln_scale, ln_bias, state[key], state["base"])
  nc = -(-T // b) if assume_aligned else -(-(T + b - 1) // b)
  tp = nc * b
  phase0 = jnp.zeros((B,), jnp.int32) if assume_aligned else state["phase"].astype(jnp.int32)
  n_real = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  real = jnp.arange(T)[None, :] < n_real[:, None]            # [B, T]

  def shift(x, fill):
    """[B, T, ...] -> [B, tp, ...] with token j at position phase0 + j, `fill` elsewhere."""
    x = x.astype(dt)
    pad = [(0, 0)] * (x.ndim - 2)
    if assume_aligned:
      return jnp.pad(x, [(0, 0), (0, tp - T)] + pad, constant_values=fill)
    ext = jnp.pad(x, [(0, 0), (b - 1, tp - T)] + pad, constant_values=fill)
    return jax.vmap(lambda e, p_: lax.dynamic_slice_in_dim(e, b - 1 - p_, tp, 0))(ext, phase0)

  def chunks(x):
    """[B, tp, H, ...] -> [nc, B, H, b, ...]."""
    x = x.reshape((B, nc, b) + x.shape[2:])
    return jnp.moveaxis(x, (1, 3), (0, 2))

  xs = (chunks(shift(q, 0.0)), chunks(shift(k, 0.0)), chunks(shift(v, 0.0)),
        chunks(shift(jnp.where(real[..., None, None], theta, 0), 0.0)),
        chunks(shift(jnp.where(real[..., None], a, 1), 1.0)),
        chunks(shift(jnp.where(real[..., None], delta, 1), 1.0)))
  ln_s, ln_b, c_HL = ln_scale.astype(dt), ln_bias.astype(dt), kl_scale.astype(dt)
  x0 = tuple(x.astype(dt) for x in state[key])
  xb0 = tuple(x.astype(dt) for x in state["base"])
  c_last = (phase0 + n_real - 1) // b                         # chunk of the last real token (-1: none)
  lag = lag_token and b > 1
  step = functools.partial(chunk_step, bias=bias, p=p, retention=retention, q_norm=q_norm, lag=lag)
  # heads carry their own KL scale and LayerNorm affine; batch rows share them
  step_bh = jax.vmap(jax.vmap(step, in_axes=(0,) * 8 + (None,) + (0,) * 3),
                     in_axes=(0,) * 9 + (None, None, None))

  @jax.checkpoint
  def compute(x, first, xs_c):
    base = tuple(jnp.where(first, b0, x_) for b0, x_ in zip(xb0, x))
    keep = first & (phase0 > 0)                                # [B]
    y, x_new, base = step_bh(x, base, *xs_c, keep, c_HL, ln_s, ln_b)
    return y, x_new, base

  def body(carry, inp):
    x, sel = carry
    c, xs_c = inp
    y, x_new, base = compute(x, c == 0, xs_c)
    h = (c == c_last).astype(dt)[:, None, None, None]         # exact 0/1 blend (cheap backward)
    sel = tuple(b_ * h + o * (1 - h) for b_, o in zip(base, sel))
    return (x_new, sel), y

  (x_end, sel), y = lax.scan(body, (x0, xb0), (jnp.arange(nc), xs), unroll=nc if nc <= 4 else 1)
  y = jnp.moveaxis(y, (0, 2), (1, 3)).reshape(B, tp, H, D)
  if assume_aligned:
    o = y[:, :T]
  else:
    o = jax.vmap(lambda x, p_: lax.dynamic_slice_in_dim(x, p_, T, 0))(y, phase0)
  phase = (phase0 + n_real) % b
  fresh = (phase == 0) | (phase == 1) if lag else phase == 0   # the base is the current state
  refresh = (fresh & (n_real > 0))[:, None, None, None]
  base = tuple(jnp.where(refresh, x, o_) for x, o_ in zip(x_end, sel))
  return o.astype(q.dtype), {key: x_end, "base": base, "phase": phase}
