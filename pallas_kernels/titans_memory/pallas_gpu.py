"""Titans memory: the per-chunk step as a Pallas GPU kernel (`pl.pallas_call`, Triton lowering).

Titans (Behrouz et al., arXiv 2501.00663 v1 §3.2, Eq. 16-18; docs/architectures/titans.md).
The whole chunked engine stays `xla.memory_xla` (scan over chunks, `jax.checkpoint`, phase shift,
padding masks, chunk-end carry); this module only replaces its vmapped `chunk_step` through the
`chunk_fn` hook, so the kernel path inherits split invariance and the chunk-boundary backprop
memory.

One chunk of n tokens of one (batch row, head) per program, grid (B, H), everything fused:

  1. Inner-gradient factors at the base W_base (one batched forward/backward of the chunk's keys,
     written out by hand: LayerNorm backward, GELU' = Phi + x phi): u_i^(l) = g_i^(l) r_i^(l)^T.
  2. Dual-form read, layer by layer (Z the layer's input rows, Z = Q for the first):
       Z_out = diag(beta) Z X_0^T + diag(f) Z S_0^T - (G^(l) o Z R^T) Gamma,   y = Z (depth 1) or
       y = q + LN(Z) (depth 2, GELU between the layers).
  3. Chunk-end carry: X_n = beta_n X_0 + f_n S_0 - Gamma^T diag(G[n, :]) R,
                      S_n = mom_n S_0 - Gamma^T diag(theta B[n, :]) R.
  Steps 2-3 are `engine.read_and_carry`, the code the XLA path runs, over this module's dots.

The decay matrices (beta, f, mom, A diag(m) B; `xla.decay_matrices`, a cumprod) are computed outside
the kernel in plain JAX, per (b, h, chunk), and theta is folded into them there: the kernel gets
G^(l) = A diag(m) B diag(theta^(l)) [n, n], the carry columns G^(l)[n-1, :] and theta^(l) B[n-1, :]
[n, 1], beta and f [n, 1] and beta_n, f_n, mom_n [1, 1] (Triton cannot slice an element out of a
loaded tile). Their gradients (and so theta's, eta's and log_a's) flow back through plain JAX.

Backward: `jax.custom_vjp` around the per-chunk call; the residuals are the kernel inputs only. A
second `pl.pallas_call` (grid (B, H)) runs `chunk_math_bwd`, the VJP of `chunk_math` written out by
hand (one kernel, each weight tile short-lived):

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
Every weight cotangent is stored as soon as it is formed, and each [out, in] input is read where a
dot needs it (twice or three times per program in all; HBM traffic is cheap next to shared memory
here), so at most two or three state tiles are staged at a time. The LN-affine cotangents leave
per (b, h) and are summed over b outside.

Choices [ours]:
- Exact (erf) GELU as in `reference.gelu`; Triton has no erf lowering, so erf is Abramowitz &
  Stegun 7.1.26 (|error| <= 1.5e-7, below float32 resolution near 1) with a `custom_jvp` that
  gives the exact derivative 2/sqrt(pi) exp(-x^2), so first and second derivatives are exact.
- All math in float32 (bf16/f16 inputs are upcast; the engine already casts them), dots with
  HIGHEST precision: Triton then uses IEEE float32 (DEFAULT would mean TF32 on the device).
- Supported: the Titans rule (l2 bias, identity retention, momentum), depth 1 (linear) and depth 2
  (MLP), D and E powers of two >= 16 and a power-of-two chunk >= 16 (Triton dots need every
  dimension >= 16). Anything else raises NotImplementedError (dispatch then falls back to xla).
- Shared memory bounds the design: Triton stages every dot operand in shared memory from its load
  on, so the kernels read each input where it is used (`_Lazy`) and the backward stores each weight
  cotangent as soon as it is formed; both then fit up to MAX_STATE_BYTES of float32 weights per
  head. Above it the op raises NotImplementedError. num_warps = 4 at depth 1, 8 at depth 2;
  num_stages = 1 (nothing is looped over inside a program). The compiler's shared-memory and
  register numbers and the H100 parity run are in docs/results.md ("Titans memory Pallas kernel").
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import check_kernel_dtypes, is_pow2, tile_dot
from pallas_kernels.titans_memory.engine import (
  ChunkCarry,
  ChunkEnds,
  ChunkOut,
  ChunkTokens,
  DotOps,
  MemoryInputs,
  MemoryParams,
  MemoryState,
  read_and_carry,
)
from pallas_kernels.titans_memory.reference import LN_EPS
from pallas_kernels.titans_memory.rules import TITANS
from pallas_kernels.titans_memory.xla import decay_matrices, memory_xla

f32 = jnp.float32
# Shared-memory bound (module docstring): the forward needs about 1.4x, the backward about 1x the
# bytes of one head's float32 weights; an H100 / H200 block gets at most 227 KiB (docs/results.md).
MAX_STATE_BYTES = 128 * 1024     # D = 64, E = 256


# ------------------------------------------------------------------ per-program math (2-D tiles)

_mm = tile_dot                                 # a @ b
_mm_t = functools.partial(tile_dot, tb=True)   # a @ b^T
_t_mm = functools.partial(tile_dot, ta=True)   # a^T @ b


@jax.custom_jvp
def _erf(x):
  """erf(x), Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), odd extension; Triton lowers it."""
  z = jnp.abs(x)
  t = 1.0 / (1.0 + 0.3275911 * z)
  poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                         + t * 1.061405429))))
  return jnp.sign(x) * (1.0 - poly * jnp.exp(-z * z))


@_erf.defjvp
def _erf_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return _erf(x), (2.0 / math.sqrt(math.pi)) * jnp.exp(-x * x) * dx


def _gelu(x):
  """Exact GELU x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
  return x * 0.5 * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_grad(x):
  """GELU'(x) = Phi(x) + x phi(x)."""
  phi = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return 0.5 * (1.0 + _erf(x * (1.0 / math.sqrt(2.0)))) + x * phi


def _mean(x):  # over the features, kept as a column [n, 1]
  return jnp.sum(x, axis=-1, keepdims=True) * (1.0 / x.shape[-1])


def _normalize(x):
  """(x - mean) / sqrt(var + eps) over the features and the reciprocal std [n, 1]."""
  xc = x - _mean(x)
  rstd = lax.rsqrt(_mean(xc * xc) + LN_EPS)
  return xc * rstd, rstd


class ChunkIn(NamedTuple):
  """One program's tiles, float32. Per-layer fields are tuples over the memory layers."""
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


class _Lazy:
  """A kernel input read where it is used (`_val`), not at the top of the program: Triton stages
  every dot operand in shared memory from its load on, so six [E, D] state tiles loaded up front
  would all be resident at once (more than an H100 block has at D = 64, E = 256)."""

  def __init__(self, ref):
    self.ref = ref


def _val(x):
  return x.ref[...].astype(f32) if isinstance(x, _Lazy) else x


def grad_factors(xb, k, v, ln_s, ln_b):
  """(r, g) per layer: u_i^(l) = g_i^(l) r_i^(l)^T = grad of 1/2 ||M_W(k_i) - v_i||^2 at W = xb.

  Depth 1 is v1 Eq. 16-18 (E = K W^T - V); depth 2 backpropagates e through
  M_W(k) = k + LN(W_2 gelu(W_1 k)) by hand (the same factors as `xla.grad_factors`).
  """
  if len(xb) == 1:
    return (k,), (_mm_t(k, _val(xb[0])) - v,)
  a1 = _mm_t(k, _val(xb[0]))                         # [n, E]
  h1 = _gelu(a1)
  xhat, rstd = _normalize(_mm_t(h1, _val(xb[1])))    # [n, D]
  dxhat = (k + xhat * ln_s + ln_b - v) * ln_s        # e = M_W(k) - v through the LN affine
  g2 = rstd * (dxhat - _mean(dxhat) - xhat * _mean(dxhat * xhat))
  g1 = _mm(g2, _val(xb[1])) * _gelu_grad(a1)         # [n, E]
  return (k, h1), (g1, g2)


KERNEL_OPS = DotOps(mm=_mm, mm_t=_mm_t, t_mm=_t_mm, gelu=_gelu,
                    layer_norm=lambda x, scale, bias: _normalize(x)[0] * scale + bias, val=_val)


def chunk_math(c: ChunkIn):
  """One chunk of one (batch row, head): (y [n, D], X_n, S_n); module docstring steps 1-3.
  Fields of c may be `_Lazy` (the forward kernel). Steps 2-3 are `engine.read_and_carry`, the code
  the XLA path runs, here over Triton-lowerable dots; each layer's states are read, used for the
  read and carried in one place, which keeps their live ranges short."""
  q, k, v, ln_s, ln_b = map(_val, (c.q, c.k, c.v, c.ln_s, c.ln_b))
  rs, gs = grad_factors(c.xb, k, v, ln_s, ln_b)
  ends = ChunkEnds(beta_n=c.beta_n, f_n=c.f_n, mom_n=c.mom_n, g_end=c.g_end, s_end=c.s_end)
  return read_and_carry(KERNEL_OPS, q, rs, gs, c.G, c.x, _val(c.beta), _val(c.f), c.x, c.s, ends,
                        ln_s, ln_b)


def _rowsum(x):   # [n, m] -> [n, 1]
  return jnp.sum(x, axis=1, keepdims=True)


def _colsum(x):   # [n, m] -> [1, m]
  return jnp.sum(x, axis=0, keepdims=True)


def _total(x):    # [r, c] -> [1, 1]
  return _colsum(_rowsum(x))


def chunk_math_bwd(c: ChunkIn, cts, put):
  """The VJP of `chunk_math`, written out by hand (module docstring, "Backward", steps 4-6).

  cts = (dy [n, D], dX_n, dS_n). Each cotangent is handed to `put(field, l, value)` (l the layer of
  a per-layer field, else None) once final: a weight cotangent right where it is formed, so at most
  a couple of [out, in] tiles are live at a time. The forward intermediates are all [n, *] rows and
  are recomputed first (`_val` reads each weight where it is used, twice or three times in all).
  """
  L = len(c.x)
  dy, cx, cs = _val(cts[0]), cts[1], cts[2]
  q, k, v, ln_s, ln_b = map(_val, (c.q, c.k, c.v, c.ln_s, c.ln_b))
  beta, f = _val(c.beta), _val(c.f)
  # ---- step 4: recompute step 1 (inner-gradient factors), keeping what its VJP needs
  if L == 1:
    rs, gs = (k,), (_mm_t(k, _val(c.xb[0])) - v,)
  else:
    a1 = _mm_t(k, _val(c.xb[0]))                       # [n, E]
    h1, gp = _gelu(a1), _gelu_grad(a1)
    xc = _mm_t(h1, _val(c.xb[1]))                      # o2 [n, D], centred below
    xc = xc - _mean(xc)
    rstd = lax.rsqrt(_mean(xc * xc) + LN_EPS)
    xhat = xc * rstd
    res = k + xhat * ln_s + ln_b - v                   # e = M_W(k) - v
    dxhat = res * ln_s
    m2 = _mean(dxhat * xhat)
    g2 = rstd * (dxhat - _mean(dxhat) - xhat * m2)
    c1 = _mm(g2, _val(c.xb[1]))                        # [n, E], g1 = c1 GELU'(a1)
    rs, gs = (k, h1), (c1 * gp, g2)
  # ---- step 4: recompute step 2 (the read), keeping each layer's input z, z X^T, z S^T, z R^T
  zs, us, ws, zrs, ps, z = [], [], [], [], [], q
  for l in range(L):
    zs.append(z)
    us.append(_mm_t(z, _val(c.x[l])))
    ws.append(_mm_t(z, _val(c.s[l])))
    zrs.append(_mm_t(z, rs[l]))
    p = beta * us[l] + f * ws[l] - _mm(_val(c.G[l]) * zrs[l], gs[l])
    ps.append(p)
    z = _gelu(p) if l < L - 1 else p
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
  dbeta_n = df_n = dmom_n = jnp.zeros((1, 1), f32)
  drs, dgs = [None] * L, [None] * L
  for l in reversed(range(L)):
    z, r, g = zs[l], rs[l], gs[l]
    G = _val(c.G[l])
    dbeta += _rowsum(dp * us[l])
    df += _rowsum(dp * ws[l])
    dM = -_mm_t(dp, g)                                  # [n, n], M = G o (z R^T)
    put("G", l, dM * zrs[l])
    Q = dM * G                                          # cotangent of z R^T
    dg = -_t_mm(G * zrs[l], dp)
    dr = _t_mm(Q, z)
    dz = _mm(beta * dp, _val(c.x[l])) + _mm(f * dp, _val(c.s[l])) + _mm(Q, r)
    # carry: X_n = beta_n X + f_n S - (g o g_end)^T r,  S_n = mom_n S - (g o s_end)^T r
    g_end, s_end = _val(c.g_end[l]), _val(c.s_end[l])
    kx, ks = _mm_t(r, _val(cx[l])), _mm_t(r, _val(cs[l]))   # [n, out]
    put("g_end", l, -_rowsum(g * kx))
    put("s_end", l, -_rowsum(g * ks))
    dg = dg - g_end * kx - s_end * ks
    dr = dr - _mm(g * g_end, _val(cx[l])) - _mm(g * s_end, _val(cs[l]))
    dbeta_n += _total(_val(cx[l]) * _val(c.x[l]))
    df_n += _total(_val(cx[l]) * _val(c.s[l]))
    dmom_n += _total(_val(cs[l]) * _val(c.s[l]))
    put("x", l, _val(c.beta_n) * _val(cx[l]) + _t_mm(beta * dp, z))
    put("s", l, _val(c.f_n) * _val(cx[l]) + _val(c.mom_n) * _val(cs[l]) + _t_mm(f * dp, z))
    drs[l], dgs[l] = dr, dg
    if l > 0:                                           # z = GELU(p_{l-1})
      dp = dz * _gelu_grad(ps[l - 1])
    else:
      dq += dz
  # ---- step 6: step 1 backward, (r, g) of every layer back to k, v, W_base and the LN affine
  if L == 1:
    dg = dgs[0]
    dk = drs[0] + _mm(dg, _val(c.xb[0]))
    put("xb", 0, _t_mm(dg, k))
    dv = -dg
  else:
    dg1, dg2 = dgs
    dc1, dgp = dg1 * gp, dg1 * c1
    dg2 = dg2 + _mm_t(dc1, _val(c.xb[1]))
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
    put("xb", 1, _t_mm(g2, dc1) + _t_mm(do2, h1))
    phi = jnp.exp(-0.5 * a1 * a1) * (1.0 / math.sqrt(2.0 * math.pi))
    da1 = (drs[1] + _mm(do2, _val(c.xb[1]))) * gp + dgp * phi * (2.0 - a1 * a1)   # GELU''
    dk = drs[0] + dres + _mm(da1, _val(c.xb[0]))
    put("xb", 0, _t_mm(da1, k))
    dv = -dres
  for name, val in (("q", dq), ("k", dk), ("v", dv), ("beta", dbeta), ("f", df),
                    ("beta_n", dbeta_n), ("f_n", df_n), ("mom_n", dmom_n), ("ln_s", dln_s),
                    ("ln_b", dln_b)):
    put(name, None, val)


# ------------------------------------------------------------------ kernels

@dataclasses.dataclass(frozen=True)
class _Config:
  interpret: bool
  num_warps: int


def _spec(shape):
  """[B, H, r, c] arrays: one (b, h) tile; [H, r, c] (the LN affine): shared over the batch."""
  if len(shape) == 4:
    return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda b, h: (b, h, 0, 0))
  return pl.BlockSpec((None,) + tuple(shape[1:]), lambda b, h: (h, 0, 0))


def _store(refs, xs):
  for r, x in zip(refs, xs):
    r[...] = x.astype(r.dtype)


def _fwd_kernel(*refs, tree, n_in: int):
  ins = jax.tree.unflatten(tree, [_Lazy(r) for r in refs[:n_in]])
  _store(refs[n_in:], jax.tree.leaves(chunk_math(ins)))


def _bwd_kernel(*refs, tree, ct_tree, n_in: int, n_ct: int):
  ins = jax.tree.unflatten(tree, [_Lazy(r) for r in refs[:n_in]])
  cts = jax.tree.unflatten(ct_tree, [_Lazy(r) for r in refs[n_in:n_in + n_ct]])
  outs = jax.tree.unflatten(tree, refs[n_in + n_ct:])

  def put(name, l, val):
    ref = getattr(outs, name) if l is None else getattr(outs, name)[l]
    ref[...] = val.astype(ref.dtype)

  chunk_math_bwd(ins, cts, put)


def _call(cfg, kernel, name, args, out_shapes):
  B, H = args[0].shape[:2]
  return pl.pallas_call(
      kernel,
      grid=(B, H),
      in_specs=[_spec(a.shape) for a in args],
      out_specs=[_spec(o.shape) for o in out_shapes],
      out_shape=out_shapes,
      # Triton params select the Triton lowering (jax 0.10 otherwise defaults to Mosaic GPU).
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=cfg.interpret,
      name=name,
  )(*args)


def _forward(cfg, ins: ChunkIn):
  leaves, tree = jax.tree.flatten(ins)
  sds = lambda x: jax.ShapeDtypeStruct(x.shape, f32)
  outs, out_tree = jax.tree.flatten((sds(ins.q), tuple(map(sds, ins.x)), tuple(map(sds, ins.s))))
  kernel = functools.partial(_fwd_kernel, tree=tree, n_in=len(leaves))
  return jax.tree.unflatten(out_tree, _call(cfg, kernel, "titans_memory_chunk_fwd", leaves, outs))


def _backward(cfg, ins: ChunkIn, cts):
  leaves, tree = jax.tree.flatten(ins)
  ct_leaves, ct_tree = jax.tree.flatten(cts)
  B, H = ins.q.shape[:2]
  # every cotangent leaves per (b, h); the LN affine's [H, 1, D] ones are summed over b below
  outs = [jax.ShapeDtypeStruct((B, H) + x.shape[-2:], f32) for x in leaves]
  kernel = functools.partial(_bwd_kernel, tree=tree, ct_tree=ct_tree, n_in=len(leaves),
                             n_ct=len(ct_leaves))
  d = _call(cfg, kernel, "titans_memory_chunk_bwd", leaves + ct_leaves, outs)
  d = [g.sum(axis=0) if x.ndim == 3 else g for g, x in zip(d, leaves)]
  return jax.tree.unflatten(tree, [g.astype(x.dtype) for g, x in zip(d, leaves)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_call(cfg, ins):
  return _forward(cfg, ins)


def _chunk_call_fwd(cfg, ins):
  return _forward(cfg, ins), ins       # residuals: the kernel inputs only


def _chunk_call_bwd(cfg, ins, cts):
  return (_backward(cfg, ins, cts),)


_chunk_call.defvjp(_chunk_call_fwd, _chunk_call_bwd)


def _chunk_fn(cfg, carry: ChunkCarry, tok: ChunkTokens, params: MemoryParams, keep) -> ChunkOut:
  """`memory_xla`'s chunk_fn: the batched `chunk_step` of the Titans rule for one chunk of every
  (b, h): tokens [B, H, n, ...] (mask m [B, n]), carry [B, H, ...], params [H, ...]. The base
  and its retention product pass through unchanged (phi is the identity, no lag token)."""
  del keep                             # Titans: no lag token (and no Huber threshold, no KL scale)
  x, s, xb, pb = carry
  beta, f, AmB, mom, Bm = jax.vmap(jax.vmap(decay_matrices, (0, 0, None)))(tok.a, tok.eta, tok.m)
  col = lambda t: t[..., None]
  G = tuple(AmB * tok.theta[..., None, :, l] for l in range(len(x)))
  ins = ChunkIn(
      q=tok.q, k=tok.k, v=tok.v, beta=col(beta), f=col(f), beta_n=col(beta[..., -1:]),
      f_n=col(f[..., -1:]), mom_n=col(mom[..., -1:]), G=G,
      g_end=tuple(col(g[..., -1, :]) for g in G),
      s_end=tuple(col(tok.theta[..., l] * Bm[..., -1, :]) for l in range(len(x))),
      x=tuple(x), s=tuple(s), xb=tuple(xb), ln_s=params.ln_scale[:, None, :],
      ln_b=params.ln_bias[:, None, :])
  ins = jax.tree.map(lambda t: t.astype(f32), ins)
  y, x_new, s_new = _chunk_call(cfg, ins)
  return ChunkOut(y, x_new, s_new, xb, pb)


def check_supported(rule, inputs: MemoryInputs, params: MemoryParams, state: MemoryState,
                    chunk_size) -> int:
  """NotImplementedError (one line) for what the kernel does not handle; returns the depth L."""
  name = "titans_memory"
  if rule != TITANS:
    raise NotImplementedError(f"{name}: pallas_gpu runs the Titans rule only, got {rule}")
  leaves = jax.tree.leaves((inputs._replace(resets=None), params, (state.x, state.s, state.base)))
  check_kernel_dtypes(name, *leaves)
  if not is_pow2(chunk_size, 16):
    raise NotImplementedError(f"{name}: pallas_gpu needs a power-of-two chunk_size >= 16 "
                              f"(Triton dots), got {chunk_size}")
  ws = tuple(state.x)
  if len(ws) > 2:
    raise NotImplementedError(f"{name}: pallas_gpu supports memory depth 1 or 2, got {len(ws)}")
  dims = {"D": inputs.q.shape[-1]} | ({"E": ws[0].shape[-2]} if len(ws) == 2 else {})
  for n, d in dims.items():
    if not is_pow2(d, 16):
      raise NotImplementedError(f"{name}: pallas_gpu needs {n} a power of two >= 16, got {d}")
  if _state_bytes(ws) > MAX_STATE_BYTES:
    raise NotImplementedError(f"{name}: pallas_gpu keeps the memory weights of a head in one "
                              f"program; needs <= {MAX_STATE_BYTES} bytes of float32 weights, "
                              f"got {_state_bytes(ws)}")
  return len(ws)


def _state_bytes(ws) -> int:
  """float32 bytes of one head's memory weights (all layers)."""
  return sum(4 * w.shape[-2] * w.shape[-1] for w in ws)


def memory_pallas_gpu(rule, inputs: MemoryInputs, params: MemoryParams, state: MemoryState, *,
                      chunk_size, lengths=None, reset: MemoryState | None = None,
                      assume_aligned=False, interpret=False):
  """`xla.memory_xla` with the per-chunk step as a Pallas kernel; same arguments and result
  (inputs already validated). Raises NotImplementedError for what the kernel does not support."""
  L = check_supported(rule, inputs, params, state, chunk_size)
  cfg = _Config(interpret=interpret, num_warps=4 if L == 1 else 8)
  return memory_xla(rule, inputs, params, state, chunk_size=chunk_size, lengths=lengths,
                    reset=reset, assume_aligned=assume_aligned,
                    chunk_fn=functools.partial(_chunk_fn, cfg))
