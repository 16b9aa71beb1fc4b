"""One chunk of the Titans memory with its VJP written out by hand, over 2-D tiles.

Titans (Behrouz et al., arXiv 2501.00663 v1 §3.2, Eq. 16-18; docs/architectures/titans.md), the
Titans rule only (l2 bias, identity retention, momentum), memory depth 1 or 2. One chunk of n tokens
of one (batch row, head):

  1. Inner-gradient factors at the base W_base (one batched forward/backward of the chunk's keys,
     written out: LayerNorm backward, GELU' = Phi + x phi): u_i^(l) = g_i^(l) r_i^(l)^T.
  2. Dual-form read, layer by layer (Z the layer's input rows, Z = Q for the first):
       Z_out = diag(beta) Z X_0^T + diag(f) Z S_0^T - (G^(l) o Z R^T) Gamma,   y = Z (depth 1) or
       y = q + LN(Z) (depth 2, GELU between the layers).
  3. Chunk-end carry: X_n = beta_n X_0 + f_n S_0 - Gamma^T diag(G[n, :]) R,
                      S_n = mom_n S_0 - Gamma^T diag(theta B[n, :]) R.
  Steps 2-3 are `engine.read_and_carry`, the code every chunked path runs.

`chunk_math_bwd` is its VJP:

  4. Recompute the [n, *] rows of steps 1-2: the factors (r, g) with their LayerNorm and GELU
     intermediates, and per layer its input Z, Z X_0^T, Z S_0^T, Z R^T and pre-activation.
  5. Layers last to first, with P = dZ_out the cotangent of layer l's output (through the outer
     LN at depth 2, through GELU' between the layers), M = G o Z R^T and Q = -(P Gamma^T) o G:
       dX_0 = beta_n dX_n + (diag(beta) P)^T Z,   dS_0 = f_n dX_n + mom_n dS_n + (diag(f) P)^T Z,
       dZ = diag(beta) P X_0 + diag(f) P S_0 + Q R,
       dR = Q^T Z - diag(g_end) Gamma dX_n - diag(s_end) Gamma dS_n,
       dGamma = -M^T P - diag(g_end) R dX_n^T - diag(s_end) R dS_n^T,
       dG = -(P Gamma^T) o Z R^T,  dbeta = rowsum(P o Z X_0^T),  df = rowsum(P o Z S_0^T),
       dg_end = -rowsum(Gamma o R dX_n^T),  ds_end = -rowsum(Gamma o R dS_n^T),
       dbeta_n = <dX_n, X_0>,  df_n = <dX_n, S_0>,  dmom_n = <dS_n, S_0>  (summed over layers).
  6. The factors' VJP back to k, v, W_base and the LN affine: the second-order terms of the inner
     gradient (the backward of step 1's LayerNorm backward, GELU'' = phi (2 - x^2)).

Two paths run this math over their own primitives (`engine.DotOps`): the Pallas GPU kernel
(`pallas_gpu.py`: Triton dots, a polynomial erf, inputs read lazily from refs) and, for the
Titans rule, the XLA engine (`xla.py`: batched by vmap, exact erf, any float dtype), where it
replaces autodiff of the vjp inside step 1: the same products in a smaller program, which compiles
faster (docs/results.md).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.titans_memory.engine import ChunkEnds, DotOps, read_and_carry
from pallas_kernels.titans_memory.reference import LN_EPS

INV_SQRT_2PI = 0.3989422804014327   # 1 / sqrt(2 pi)
SQRT_HALF = 0.7071067811865476      # 1 / sqrt(2)


class ChunkIn(NamedTuple):
  """One chunk's tiles. Per-layer fields are tuples over the memory layers."""
  q: jax.Array        # [n, D] queries
  k: jax.Array        # [n, D] keys
  v: jax.Array        # [n, D] values
  beta: jax.Array     # [n, 1] prod_{j<=t} a_j
  f: jax.Array        # [n, 1] (A diag(m) mom)_t
  beta_n: jax.Array   # [1, 1] beta at the chunk's last token
  f_n: jax.Array      # [1, 1] f at the last token
  mom_n: jax.Array    # [1, 1] prod_j eta_j over the chunk
  G: tuple            # [n, n] A diag(m) B diag(theta^(l)), lower triangular
  g_end: tuple        # [n, 1] G^(l)[n-1, :] as a column (the X carry)
  s_end: tuple        # [n, 1] theta^(l) B[n-1, :] as a column (the S carry)
  x: tuple            # [out, in] X_0, the chunk's starting weights
  s: tuple            # [out, in] S_0, the momentum
  xb: tuple           # [out, in] W_base, where the inner gradients are taken
  ln_s: jax.Array     # [1, D] outer LayerNorm scale (unused at depth 1)
  ln_b: jax.Array     # [1, D] outer LayerNorm bias


def gelu_pdf(x):
  """phi(x), the standard normal density: GELU' = Phi + x phi and GELU'' = phi (2 - x^2)."""
  return jnp.exp(-0.5 * x * x) * INV_SQRT_2PI


def gelu_grad(x, erf=lax.erf):
  """GELU'(x) = Phi(x) + x phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 (`erf`: the path's own)."""
  return 0.5 * (1.0 + erf(x * SQRT_HALF)) + x * gelu_pdf(x)


def _mean(x):  # over the features, kept as a column [n, 1]
  return jnp.sum(x, axis=-1, keepdims=True) * (1.0 / x.shape[-1])


def _normalize(x):
  """(x - mean) / sqrt(var + eps) over the features and the reciprocal std [n, 1]."""
  xc = x - _mean(x)
  rstd = lax.rsqrt(_mean(xc * xc) + LN_EPS)
  return xc * rstd, rstd


def layer_norm(x, scale, bias):
  return _normalize(x)[0] * scale + bias


def _rowsum(x):   # [n, m] -> [n, 1]
  return jnp.sum(x, axis=1, keepdims=True)


def _colsum(x):   # [n, m] -> [1, m]
  return jnp.sum(x, axis=0, keepdims=True)


def _total(x):    # [r, c] -> [1, 1]
  return _colsum(_rowsum(x))


def grad_factors(ops: DotOps, xb, k, v, ln_s, ln_b):
  """(r, g) per layer: u_i^(l) = g_i^(l) r_i^(l)^T = grad of 1/2 ||M_W(k_i) - v_i||^2 at W = xb.

  Depth 1 is v1 Eq. 16-18 (E = K W^T - V); depth 2 backpropagates e through
  M_W(k) = k + LN(W_2 gelu(W_1 k)) by hand (the same factors as `xla.grad_factors`).
  """
  if len(xb) == 1:
    return (k,), (ops.mm_t(k, ops.val(xb[0])) - v,)
  a1 = ops.mm_t(k, ops.val(xb[0]))                         # [n, E]
  h1 = ops.gelu(a1)
  xhat, rstd = _normalize(ops.mm_t(h1, ops.val(xb[1])))    # [n, D]
  dxhat = (k + xhat * ln_s + ln_b - v) * ln_s              # e = M_W(k) - v through the LN affine
  g2 = rstd * (dxhat - _mean(dxhat) - xhat * _mean(dxhat * xhat))
  g1 = ops.mm(g2, ops.val(xb[1])) * ops.gelu_grad(a1)      # [n, E]
  return (k, h1), (g1, g2)


def chunk_math(ops: DotOps, c: ChunkIn):
  """One chunk of one (batch row, head): (y [n, D], X_n, S_n); module docstring steps 1-3.
  Each layer's states are read (`ops.val`), used for the read and carried in one place, which
  keeps their live ranges short in the kernel."""
  q, k, v, ln_s, ln_b = map(ops.val, (c.q, c.k, c.v, c.ln_s, c.ln_b))
  rs, gs = grad_factors(ops, c.xb, k, v, ln_s, ln_b)
  ends = ChunkEnds(beta_n=c.beta_n, f_n=c.f_n, mom_n=c.mom_n, g_end=c.g_end, s_end=c.s_end)
  return read_and_carry(ops, q, rs, gs, c.G, c.x, ops.val(c.beta), ops.val(c.f), c.x, c.s, ends,
                        ln_s, ln_b)


def chunk_math_bwd(ops: DotOps, c: ChunkIn, cts, put):
  """The VJP of `chunk_math` (module docstring, steps 4-6).

  cts = (dy [n, D], dX_n, dS_n). Each cotangent is handed to `put(field, l, value)` (l the layer of
  a per-layer field, else None) once final: a weight cotangent right where it is formed, so at most
  a couple of [out, in] tiles are live at a time in the kernel. The forward intermediates are all
  [n, *] rows and are recomputed first (`ops.val` reads each weight where it is used).
  """
  mm, mm_t, t_mm, val = ops.mm, ops.mm_t, ops.t_mm, ops.val
  L = len(c.x)
  dy, cx, cs = val(cts[0]), cts[1], cts[2]
  q, k, v, ln_s, ln_b = map(val, (c.q, c.k, c.v, c.ln_s, c.ln_b))
  beta, f = val(c.beta), val(c.f)
  # ---- step 4: recompute step 1 (inner-gradient factors), keeping what its VJP needs
  if L == 1:
    rs, gs = (k,), (mm_t(k, val(c.xb[0])) - v,)
  else:
    a1 = mm_t(k, val(c.xb[0]))                         # [n, E]
    h1, gp = ops.gelu(a1), ops.gelu_grad(a1)
    xc = mm_t(h1, val(c.xb[1]))                        # o2 [n, D], centred below
    xc = xc - _mean(xc)
    rstd = lax.rsqrt(_mean(xc * xc) + LN_EPS)
    xhat = xc * rstd
    res = k + xhat * ln_s + ln_b - v                   # e = M_W(k) - v
    dxhat = res * ln_s
    m2 = _mean(dxhat * xhat)
    g2 = rstd * (dxhat - _mean(dxhat) - xhat * m2)
    c1 = mm(g2, val(c.xb[1]))                          # [n, E], g1 = c1 GELU'(a1)
    rs, gs = (k, h1), (c1 * gp, g2)
  # ---- step 4: recompute step 2 (the read), keeping each layer's input z, z X^T, z S^T, z R^T
  zs, us, ws, zrs, ps, z = [], [], [], [], [], q
  for l in range(L):
    zs.append(z)
    us.append(mm_t(z, val(c.x[l])))
    ws.append(mm_t(z, val(c.s[l])))
    zrs.append(mm_t(z, rs[l]))
    p = beta * us[l] + f * ws[l] - mm(val(c.G[l]) * zrs[l], gs[l])
    ps.append(p)
    z = ops.gelu(p) if l < L - 1 else p
  # ---- output: y = z (depth 1) or q + LN(z) (depth 2)
  if L == 1:
    dp, dq = dy, jnp.zeros_like(q)
    dln_s, dln_b = jnp.zeros_like(ln_s), jnp.zeros_like(ln_b)
  else:
    yc = z - _mean(z)
    yrstd = lax.rsqrt(_mean(yc * yc) + LN_EPS)
    yhat = yc * yrstd
    dln_s, dln_b = _colsum(dy * yhat), _colsum(dy)
    dyhat = dy * ln_s
    dp = yrstd * (dyhat - _mean(dyhat) - yhat * _mean(dyhat * yhat))
    dq = dy
  # ---- step 5: steps 2-3 backward, last layer first; dp (P) is the cotangent of layer l's output
  dbeta, df = jnp.zeros_like(beta), jnp.zeros_like(f)
  dbeta_n = df_n = dmom_n = jnp.zeros((1, 1), beta.dtype)
  drs, dgs = [None] * L, [None] * L
  for l in reversed(range(L)):
    z, r, g = zs[l], rs[l], gs[l]
    G = val(c.G[l])
    dbeta += _rowsum(dp * us[l])
    df += _rowsum(dp * ws[l])
    dM = -mm_t(dp, g)                                   # [n, n], M = G o (z R^T)
    put("G", l, dM * zrs[l])
    Q = dM * G                                          # cotangent of z R^T
    dg = -t_mm(G * zrs[l], dp)
    dr = t_mm(Q, z)
    dz = mm(beta * dp, val(c.x[l])) + mm(f * dp, val(c.s[l])) + mm(Q, r)
    # carry: X_n = beta_n X + f_n S - (g o g_end)^T r,  S_n = mom_n S - (g o s_end)^T r
    g_end, s_end = val(c.g_end[l]), val(c.s_end[l])
    kx, ks = mm_t(r, val(cx[l])), mm_t(r, val(cs[l]))   # [n, out]
    put("g_end", l, -_rowsum(g * kx))
    put("s_end", l, -_rowsum(g * ks))
    dg = dg - g_end * kx - s_end * ks
    dr = dr - mm(g * g_end, val(cx[l])) - mm(g * s_end, val(cs[l]))
    dbeta_n += _total(val(cx[l]) * val(c.x[l]))
    df_n += _total(val(cx[l]) * val(c.s[l]))
    dmom_n += _total(val(cs[l]) * val(c.s[l]))
    put("x", l, val(c.beta_n) * val(cx[l]) + t_mm(beta * dp, z))
    put("s", l, val(c.f_n) * val(cx[l]) + val(c.mom_n) * val(cs[l]) + t_mm(f * dp, z))
    drs[l], dgs[l] = dr, dg
    if l > 0:                                           # z = GELU(p_{l-1})
      dp = dz * ops.gelu_grad(ps[l - 1])
    else:
      dq += dz
  # ---- step 6: step 1 backward, (r, g) of every layer back to k, v, W_base and the LN affine
  if L == 1:
    dg = dgs[0]
    dk = drs[0] + mm(dg, val(c.xb[0]))
    put("xb", 0, t_mm(dg, k))
    dv = -dg
  else:
    dg1, dg2 = dgs
    dc1, dgp = dg1 * gp, dg1 * c1
    dg2 = dg2 + mm_t(dc1, val(c.xb[1]))
    # g2 = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), a LayerNorm backward itself
    e = rstd * dg2
    me = _mean(e * xhat)
    d_dxhat = e - _mean(e) - xhat * me
    drstd = _rowsum(dg2 * (dxhat - _mean(dxhat) - xhat * m2))
    dres = d_dxhat * ln_s
    dln_s += _colsum(d_dxhat * res + dres * xhat)
    dln_b += _colsum(dres)
    dxh = dres * ln_s - e * m2 - dxhat * me
    # xhat = xc rstd, rstd = (mean(xc^2) + eps)^(-1/2)
    drstd += _rowsum(dxh * xc)
    dxc = dxh * rstd - drstd * (rstd * rstd * rstd) * xc * (1.0 / xc.shape[-1])
    do2 = dxc - _mean(dxc)
    put("xb", 1, t_mm(g2, dc1) + t_mm(do2, h1))
    da1 = (drs[1] + mm(do2, val(c.xb[1]))) * gp + dgp * gelu_pdf(a1) * (2.0 - a1 * a1)  # GELU''
    dk = drs[0] + dres + mm(da1, val(c.xb[0]))
    put("xb", 0, t_mm(da1, k))
    dv = -dres
  for name, value in (("q", dq), ("k", dk), ("v", dv), ("beta", dbeta), ("f", df),
                      ("beta_n", dbeta_n), ("f_n", df_n), ("mom_n", dmom_n), ("ln_s", dln_s),
                      ("ln_b", dln_b)):
    put(name, None, value)


def chunk_cotangents(ops: DotOps, c: ChunkIn, cts) -> ChunkIn:
  """`chunk_math_bwd` collected into a ChunkIn of cotangents (the XLA path's VJP)."""
  got = {}
  chunk_math_bwd(ops, c, cts, lambda name, l, value: got.__setitem__((name, l), value))
  field = lambda name, w: (tuple(got[(name, l)] for l in range(len(w))) if isinstance(w, tuple)
                           else got[(name, None)])
  return ChunkIn(*(field(name, w) for name, w in zip(ChunkIn._fields, c)))
