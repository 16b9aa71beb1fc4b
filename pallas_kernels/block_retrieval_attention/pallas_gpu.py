"""Block-retrieval attention as Pallas GPU kernels (`pl.pallas_call`, Triton lowering):
docs/architectures/landmark.md ("The block-retrieval op"; Mohtashami & Jaggi 2023, Eq. 1-4).

The selection S_i (top-k by gate, `always` blocks, `share`) is discrete and runs in XLA
(`_common.select_blocks`); the kernels see it folded into the gate, g_ib = gate_ib for b in S_i and
-inf otherwise, plus two small "does this tile read that block" tables so that a tile skips, with
one scalar load, every block none of its queries selected and every local key tile its mask hides.

Training kernels, flash-style with a KV tile = one block of C keys (padded to Cp, a power of two):

  forward, grid (B, H, Tq/tq): for each selected block b (then each visible local tile)
      s = scale q K_b^T,  lse_b = LSE_j s_j (the block's inner normaliser, from the whole tile),
      e = g_b + s - lse_b   (local tiles: e = s),   online softmax (m, l, acc) over e.
    Writes o and the row LSE_i = m + log l, the only residual besides the inputs.
  backward (FlashAttention-2 split, Dao 2023, arXiv 2307.08691; everything recomputed per tile), with
    P = exp(e - LSE_i), Delta_i = do_i . o_i, dE = P (do v^T - Delta):
      block tiles:  dgate_ib = sum_{j in b} dE_ij,   ds_ij = dE_ij - w_ij dgate_ib
                    (w = exp(s - lse_b), the inner softmax),  dv_j = sum_i P_ij do_i
      local tiles:  ds = dE
      dq = scale ds K;  dk = scale ds^T q.
    One dq/dgate kernel per query tile (grid (B, H, Tq/tq)), one dk/dv kernel per block (grid
    (B, H, N)) and one per local key tile (grid (B, H, S/ts)); each walks the other axis.

Inference (decode) kernel, grid (B, H, Tq, splits), one query row per program: reads only the
blocks in the row's compacted selection list (built in XLA: the selected block ids first, and
their count), `splits` programs per row each taking a contiguous share of the list, flash-decoding
style; the partial (m, l, acc) are merged in XLA. It produces the same (o, LSE) as the training
forward, so the same backward applies if a decode call is differentiated. `decode=None` uses it
for calls with at most DECODE_MAX_QUERIES queries.

Choices [ours]:
- Dots run in the input dtype with float32 accumulation (bf16 tensor cores); float32 inputs use
  `Precision.HIGHEST` (the Triton lowering otherwise picks TF32). Softmax statistics in float32.
- d, dv and C are zero-padded to powers of two >= 16 (exact: zero channels, masked keys); float64
  and d, dv, C > 256 raise NotImplementedError, so `implementation=None` falls back to `xla`.
- Every (b, h) program reads the block and local masks as additive biases / int8 tiles; the local
  mask [B, Tq, S] is the caller's (for landmark training it is the block-diagonal own-block mask,
  so each query tile visits one or two local tiles).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import check_kernel_dtypes
from pallas_kernels._common import tile_dot as _dot
from pallas_kernels.block_retrieval_attention._common import NEG_INF, check_no_far, select_blocks

MAX_DIM = 256            # d, dv and the padded block size Cp
LOCAL_TILE = 64          # ts: local keys per tile
DECODE_MAX_QUERIES = 8   # decode=None: Tq <= this uses the decode kernel
DECODE_SPLITS = 4        # programs per query row in the decode kernel (at most)
HALF_NEG = NEG_INF / 2   # anything below is masked
f32 = jnp.float32



class Cfg(NamedTuple):
  """Static configuration of one call (a custom_vjp nondiff argument)."""
  scale: float
  tq: int
  cp: int
  ts: int
  ns: int           # local key tiles (0: no local part)
  t: int            # true number of queries (rows >= t are padding)
  decode: bool
  interpret: bool


class KernelInputs(NamedTuple):
  """Heads-major, padded kernel layout (Tp = Tq padded to tq, Sp = S padded to ts)."""
  q: jax.Array        # [B, H, Tp, dp]
  bk: jax.Array       # [B, H, N*Cp, dp]
  bv: jax.Array       # [B, H, N*Cp, dvp]
  g: jax.Array        # [B, H, Tp, N] float32 gate of selected blocks, NEG_INF elsewhere
  kb: jax.Array       # [B, N*Cp] float32 key bias: 0 valid, NEG_INF padding / blk_mask
  kl: jax.Array       # [B, H, Sp, dp]
  vl: jax.Array       # [B, H, Sp, dvp]
  ml: jax.Array       # [B, Tp, Sp] int8 local mask
  ba: jax.Array       # [B, H, Tp/tq, N] int32: does any query of the tile read block n
  la: jax.Array       # [B, Tp/tq, Sp/ts] int32: does any query of the tile see local tile j


# ----------------------------------------------------------------------------- tile math

def _block_logits(q, k, kbias, g, scale):
  """Adjusted logits of one block for a query tile (the grouped softmax as one softmax).

  q [tq, dp], k [Cp, dp], kbias [1, Cp] (0 valid / NEG_INF), g [tq, 1] (NEG_INF: not selected).
  Returns e = g + s - LSE_block(s) [tq, Cp] (NEG_INF where masked), the mask, and the inner
  softmax w = exp(s - LSE_block(s)) (0 where masked).
  """
  s = jnp.where(kbias > HALF_NEG, _dot(q, k, tb=True) * scale, NEG_INF)
  m_in = jnp.max(s, axis=1, keepdims=True)
  lse_in = m_in + jnp.log(jnp.sum(jnp.exp(s - m_in), axis=1, keepdims=True))
  valid = (g > HALF_NEG) & (kbias > HALF_NEG)
  e = jnp.where(valid, g + s - lse_in, NEG_INF)
  w = jnp.where(valid, jnp.exp(s - lse_in), 0.0)
  return e, valid, w


def _local_logits(q, k, mask, scale):
  valid = mask > 0
  return jnp.where(valid, _dot(q, k, tb=True) * scale, NEG_INF), valid


def _online(carry, e, valid, v):
  """One flash step: running max m, denominator l [tq, 1] and accumulator [tq, dvp]."""
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(e, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(valid, jnp.exp(e - m_new), 0.0)
  return (m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True),
          alpha * acc + _dot(p.astype(v.dtype), v))


def _compiler_params(cfg: Cfg, width: int):
  # Triton params select the Triton lowering (jax 0.10 otherwise defaults to Mosaic GPU); 8 warps
  # once a tile's float32 accumulator would need more than 128 registers per thread at 4 warps.
  return pltriton.CompilerParams(num_warps=8 if cfg.tq * width >= 128 * 128 else 4, num_stages=2)


def _cond(pred, visit, carry, skip=None):
  return lax.cond(pred, visit, skip or (lambda c: c), carry)


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, bk_ref, bv_ref, g_ref, kb_ref, kl_ref, vl_ref, ml_ref, ba_ref, la_ref,
                o_ref, lse_ref, *, cfg: Cfg, N: int):
  q = q_ref[...]
  tq, cp, ts = q.shape[0], cfg.cp, cfg.ts

  def block(n, carry):
    def visit(carry):
      sl = pl.ds(pl.multiple_of(n * cp, cp), cp)
      e, valid, _ = _block_logits(q, bk_ref[sl, :], kb_ref[sl][None, :], g_ref[:, pl.ds(n, 1)],
                                  cfg.scale)
      return _online(carry, e, valid, bv_ref[sl, :])
    return _cond(ba_ref[n] > 0, visit, carry)

  def local(j, carry):
    def visit(carry):
      sl = pl.ds(pl.multiple_of(j * ts, ts), ts)
      e, valid = _local_logits(q, kl_ref[sl, :], ml_ref[:, sl], cfg.scale)
      return _online(carry, e, valid, vl_ref[sl, :])
    return _cond(la_ref[j] > 0, visit, carry)

  carry = (jnp.full((tq, 1), NEG_INF, f32), jnp.zeros((tq, 1), f32),
           jnp.zeros((tq, o_ref.shape[1]), f32))
  carry = lax.fori_loop(0, N, block, carry)
  if cfg.ns:
    carry = lax.fori_loop(0, cfg.ns, local, carry)
  m, l, acc = carry
  ok = l > 0                                   # an empty row returns 0
  l = jnp.where(ok, l, 1.0)
  o_ref[...] = jnp.where(ok, acc / l, 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(l), NEG_INF)


def _q_tile_specs(cfg, x: KernelInputs):
  """BlockSpecs of the inputs on a grid (B, H, Tq/tq) over query tiles."""
  N, tq = x.g.shape[-1], cfg.tq
  whole_bh = lambda a: pl.BlockSpec((None, None) + a.shape[2:],
                                    lambda b, h, i: (b, h) + (0,) * (a.ndim - 2))
  tile = lambda w: pl.BlockSpec((None, None, tq, w), lambda b, h, i: (b, h, i, 0))
  return [tile(x.q.shape[-1]), whole_bh(x.bk), whole_bh(x.bv), tile(N),
          pl.BlockSpec((None, x.kb.shape[1]), lambda b, h, i: (b, 0)),
          whole_bh(x.kl), whole_bh(x.vl),
          pl.BlockSpec((None, tq, x.ml.shape[2]), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, None, None, N), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, x.la.shape[2]), lambda b, h, i: (b, i, 0))]


def _forward(cfg: Cfg, x: KernelInputs):
  B, H, Tp, _ = x.q.shape
  N, dvp = x.g.shape[-1], x.bv.shape[-1]
  tile = lambda w: pl.BlockSpec((None, None, cfg.tq, w), lambda b, h, i: (b, h, i, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, N=N),
      grid=(B, H, Tp // cfg.tq),
      in_specs=_q_tile_specs(cfg, x),
      out_specs=[tile(dvp), tile(1)],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dvp), x.q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, 1), f32)],
      compiler_params=_compiler_params(cfg, dvp),
      interpret=cfg.interpret, name="block_retrieval_attention_fwd",
  )(*x)


# ----------------------------------------------------------------------------- decode

def _decode_kernel(q_ref, bk_ref, bv_ref, g_ref, kb_ref, kl_ref, vl_ref, ml_ref, list_ref,
                   cnt_ref, acc_ref, m_ref, l_ref, *, cfg: Cfg, per: int):
  """One query row, one share of its selected blocks; dots as broadcast-multiply-reduce."""
  split = pl.program_id(3)
  q = q_ref[...].astype(f32)[None, :]              # [1, dp]
  cp, ts = cfg.cp, cfg.ts

  def update(carry, e, valid, v):                  # e [1, C'] -> scalar m, l; acc [dvp]
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(e))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(e - m_new), 0.0)  # [1, C']
    pv = jnp.sum(p.reshape(-1, 1) * v.astype(f32), axis=0)
    return m_new, alpha * l + jnp.sum(p), alpha * acc + pv

  def block(j, carry):
    n = list_ref[j]
    sl = pl.ds(pl.multiple_of(n * cp, cp), cp)
    s = jnp.sum(q * bk_ref[sl, :].astype(f32), axis=1)[None, :] * cfg.scale   # [1, Cp]
    kvalid = kb_ref[sl][None, :] > HALF_NEG
    s = jnp.where(kvalid, s, NEG_INF)
    m_in = jnp.max(s)
    lse_in = m_in + jnp.log(jnp.sum(jnp.exp(s - m_in)))
    e = jnp.where(kvalid, g_ref[n] + s - lse_in, NEG_INF)
    return update(carry, e, kvalid, bv_ref[sl, :])

  def local(j, carry):
    sl = pl.ds(pl.multiple_of(j * ts, ts), ts)
    valid = ml_ref[sl][None, :] > 0

    def visit(carry):
      s = jnp.sum(q * kl_ref[sl, :].astype(f32), axis=1)[None, :] * cfg.scale
      return update(carry, jnp.where(valid, s, NEG_INF), valid, vl_ref[sl, :])
    return _cond(jnp.max(valid.astype(jnp.int32)) > 0, visit, carry)

  lo = split * per
  hi = jnp.minimum(lo + per, cnt_ref[...])
  carry = (jnp.asarray(NEG_INF, f32), jnp.asarray(0.0, f32), jnp.zeros((acc_ref.shape[0],), f32))
  carry = lax.fori_loop(lo, jnp.maximum(lo, hi), block, carry)
  if cfg.ns:
    n_local = jnp.where(split == 0, jnp.int32(cfg.ns), jnp.int32(0))   # typed: Triton scf.for bounds
    carry = lax.fori_loop(jnp.int32(0), n_local, local, carry)
  m, l, acc = carry
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _decode(cfg: Cfg, x: KernelInputs, sel_list, sel_count):
  """Same (o, LSE) as `_forward`, reading only the listed blocks of each row; one program per
  real row (the padding rows up to Tp get o = 0, LSE = NEG_INF)."""
  B, H, Tp, dp = x.q.shape
  N, dvp = x.g.shape[-1], x.bv.shape[-1]
  splits = max(1, min(DECODE_SPLITS, N))
  per = pl.cdiv(N, splits)
  row = lambda *tail: pl.BlockSpec((None, None, None) + tail,
                                   lambda b, h, t, s: (b, h, t) + (0,) * len(tail))
  whole_bh = lambda a: pl.BlockSpec((None, None) + a.shape[2:],
                                    lambda b, h, t, s: (b, h) + (0,) * (a.ndim - 2))
  part = lambda *tail: pl.BlockSpec((None, None, None, None) + tail,
                                    lambda b, h, t, s: (b, h, t, s) + (0,) * len(tail))
  acc, m, l = pl.pallas_call(
      functools.partial(_decode_kernel, cfg=cfg, per=per),
      grid=(B, H, cfg.t, splits),
      in_specs=[row(dp), whole_bh(x.bk), whole_bh(x.bv), row(N),
                pl.BlockSpec((None, x.kb.shape[1]), lambda b, h, t, s: (b, 0)),
                whole_bh(x.kl), whole_bh(x.vl),
                pl.BlockSpec((None, None, x.ml.shape[2]), lambda b, h, t, s: (b, t, 0)),
                row(N), row()],
      out_specs=[part(dvp), part(), part()],
      out_shape=[jax.ShapeDtypeStruct((B, H, cfg.t, splits, dvp), f32),
                 jax.ShapeDtypeStruct((B, H, cfg.t, splits), f32),
                 jax.ShapeDtypeStruct((B, H, cfg.t, splits), f32)],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=cfg.interpret, name="block_retrieval_attention_decode",
  )(x.q, x.bk, x.bv, x.g, x.kb, x.kl, x.vl, x.ml, sel_list, sel_count)
  # Flash-decoding merge of the splits.
  m_max = jnp.max(m, axis=-1, keepdims=True)
  r = jnp.where(l > 0, jnp.exp(m - m_max), 0.0)
  l_tot = jnp.sum(r * l, axis=-1, keepdims=True)
  ok = l_tot > 0
  l_safe = jnp.where(ok, l_tot, 1.0)
  o = jnp.where(ok, jnp.sum(r[..., None] * acc, axis=-2) / l_safe, 0.0)
  lse = jnp.where(ok, m_max + jnp.log(l_safe), NEG_INF)
  return _pad_to(o.astype(x.q.dtype), 2, Tp), _pad_to(lse, 2, Tp, NEG_INF)


# ----------------------------------------------------------------------------- backward

def _dq_kernel(q_ref, bk_ref, bv_ref, g_ref, kb_ref, kl_ref, vl_ref, ml_ref, ba_ref, la_ref,
               do_ref, lse_ref, dl_ref, dq_ref, dg_ref, *, cfg: Cfg, N: int):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], dl_ref[...]
  tq, cp, ts = q.shape[0], cfg.cp, cfg.ts

  def block(n, dq):
    def visit(dq):
      sl = pl.ds(pl.multiple_of(n * cp, cp), cp)
      k, v = bk_ref[sl, :], bv_ref[sl, :]
      e, valid, w = _block_logits(q, k, kb_ref[sl][None, :], g_ref[:, pl.ds(n, 1)], cfg.scale)
      p = jnp.where(valid, jnp.exp(e - lse), 0.0)
      de = p * (_dot(do, v, tb=True) - delta)
      dg = jnp.sum(de, axis=1, keepdims=True)
      ds = de - w * dg
      return dq + _dot(ds.astype(k.dtype), k) * cfg.scale, dg
    dq, dg = _cond(ba_ref[n] > 0, visit, dq, lambda dq: (dq, jnp.zeros((tq, 1), f32)))
    dg_ref[:, pl.ds(n, 1)] = dg
    return dq

  def local(j, dq):
    def visit(dq):
      sl = pl.ds(pl.multiple_of(j * ts, ts), ts)
      k = kl_ref[sl, :]
      e, valid = _local_logits(q, k, ml_ref[:, sl], cfg.scale)
      p = jnp.where(valid, jnp.exp(e - lse), 0.0)
      de = p * (_dot(do, vl_ref[sl, :], tb=True) - delta)
      return dq + _dot(de.astype(k.dtype), k) * cfg.scale
    return _cond(la_ref[j] > 0, visit, dq)

  dq = lax.fori_loop(0, N, block, jnp.zeros(q.shape, f32))
  if cfg.ns:
    dq = lax.fori_loop(0, cfg.ns, local, dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_block_kernel(q_ref, k_ref, v_ref, g_ref, kb_ref, ba_ref, do_ref, lse_ref, dl_ref,
                      dk_ref, dv_ref, *, cfg: Cfg, nq: int):
  n = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  kb = kb_ref[...][None, :]
  tq = cfg.tq

  def tile(i, carry):
    def visit(carry):
      dk, dv = carry
      sl = pl.ds(pl.multiple_of(i * tq, tq), tq)
      q, do = q_ref[sl, :], do_ref[sl, :]
      e, valid, w = _block_logits(q, k, kb, g_ref[sl, pl.ds(n, 1)], cfg.scale)
      p = jnp.where(valid, jnp.exp(e - lse_ref[sl, :]), 0.0)
      de = p * (_dot(do, v, tb=True) - dl_ref[sl, :])
      ds = de - w * jnp.sum(de, axis=1, keepdims=True)
      return (dk + _dot(ds.astype(q.dtype), q, ta=True) * cfg.scale,
              dv + _dot(p.astype(do.dtype), do, ta=True))
    return _cond(ba_ref[i] > 0, visit, carry)

  dk, dv = lax.fori_loop(0, nq, tile, (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv_local_kernel(q_ref, k_ref, v_ref, ml_ref, la_ref, do_ref, lse_ref, dl_ref, dk_ref,
                      dv_ref, *, cfg: Cfg, nq: int):
  k, v = k_ref[...], v_ref[...]
  tq = cfg.tq

  def tile(i, carry):
    def visit(carry):
      dk, dv = carry
      sl = pl.ds(pl.multiple_of(i * tq, tq), tq)
      q, do = q_ref[sl, :], do_ref[sl, :]
      e, valid = _local_logits(q, k, ml_ref[sl, :], cfg.scale)
      p = jnp.where(valid, jnp.exp(e - lse_ref[sl, :]), 0.0)
      de = p * (_dot(do, v, tb=True) - dl_ref[sl, :])
      return (dk + _dot(de.astype(q.dtype), q, ta=True) * cfg.scale,
              dv + _dot(p.astype(do.dtype), do, ta=True))
    return _cond(la_ref[i] > 0, visit, carry)

  dk, dv = lax.fori_loop(0, nq, tile, (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(cfg: Cfg, x: KernelInputs, o, lse, do):
  B, H, Tp, dp = x.q.shape
  N, dvp, tq, cp, ts = x.g.shape[-1], x.bv.shape[-1], cfg.tq, cfg.cp, cfg.ts
  nq = Tp // tq
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)   # [B, H, Tp, 1]
  params = _compiler_params(cfg, max(dp, dvp))
  tile = lambda w: pl.BlockSpec((None, None, tq, w), lambda b, h, i: (b, h, i, 0))
  dq, dg = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, N=N),
      grid=(B, H, nq),
      in_specs=_q_tile_specs(cfg, x) + [tile(dvp), tile(1), tile(1)],
      out_specs=[tile(dp), tile(N)],
      out_shape=[jax.ShapeDtypeStruct(x.q.shape, x.q.dtype),
                 jax.ShapeDtypeStruct(x.g.shape, f32)],
      compiler_params=params, interpret=cfg.interpret, name="block_retrieval_attention_dq",
  )(*x, do, lse, delta)

  whole_bh = lambda a: pl.BlockSpec((None, None) + a.shape[2:],
                                    lambda b, h, n: (b, h) + (0,) * (a.ndim - 2))
  kv_tile = lambda rows, w: pl.BlockSpec((None, None, rows, w), lambda b, h, n: (b, h, n, 0))
  dbk, dbv = pl.pallas_call(
      functools.partial(_dkv_block_kernel, cfg=cfg, nq=nq),
      grid=(B, H, N),
      in_specs=[whole_bh(x.q), kv_tile(cp, dp), kv_tile(cp, dvp), whole_bh(x.g),
                pl.BlockSpec((None, cp), lambda b, h, n: (b, n)),
                pl.BlockSpec((None, None, nq, None), lambda b, h, n: (b, h, 0, n)),
                whole_bh(do), whole_bh(lse), whole_bh(delta)],
      out_specs=[kv_tile(cp, dp), kv_tile(cp, dvp)],
      out_shape=[jax.ShapeDtypeStruct(x.bk.shape, x.bk.dtype),
                 jax.ShapeDtypeStruct(x.bv.shape, x.bv.dtype)],
      compiler_params=params, interpret=cfg.interpret,
      name="block_retrieval_attention_dkv_blocks",
  )(x.q, x.bk, x.bv, x.g, x.kb, x.ba, do, lse, delta)

  if not cfg.ns:
    return dq, dbk, dbv, dg, jnp.zeros_like(x.kl), jnp.zeros_like(x.vl)
  dkl, dvl = pl.pallas_call(
      functools.partial(_dkv_local_kernel, cfg=cfg, nq=nq),
      grid=(B, H, cfg.ns),
      in_specs=[whole_bh(x.q), kv_tile(ts, dp), kv_tile(ts, dvp),
                pl.BlockSpec((None, Tp, ts), lambda b, h, j: (b, 0, j)),
                pl.BlockSpec((None, nq, None), lambda b, h, j: (b, 0, j)),
                whole_bh(do), whole_bh(lse), whole_bh(delta)],
      out_specs=[kv_tile(ts, dp), kv_tile(ts, dvp)],
      out_shape=[jax.ShapeDtypeStruct(x.kl.shape, x.kl.dtype),
                 jax.ShapeDtypeStruct(x.vl.shape, x.vl.dtype)],
      compiler_params=params, interpret=cfg.interpret,
      name="block_retrieval_attention_dkv_local",
  )(x.q, x.kl, x.vl, x.ml, x.la, do, lse, delta)
  return dq, dbk, dbv, dg, dkl, dvl


# ----------------------------------------------------------------------------- custom VJP

def _zero_cotangent(a):
  if jnp.issubdtype(a.dtype, jnp.floating):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, dtype=jax.dtypes.float0)


def make_core(inputs_cls, forward, decode, backward):
  """The custom VJP over one backend's kernels (shared by the GPU and TPU paths): the forward (or
  decode) kernel saves (o, lse); the backward kernels recompute the attention tile by tile."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(cfg, x, sel_list, sel_count):
    return core_fwd(cfg, x, sel_list, sel_count)[0]

  def core_fwd(cfg, x, sel_list, sel_count):
    o, lse = decode(cfg, x, sel_list, sel_count) if cfg.decode else forward(cfg, x)
    return o, (x, o, lse, sel_list, sel_count)

  def core_bwd(cfg, res, do):
    x, o, lse, sel_list, sel_count = res
    dq, dbk, dbv, dg, dkl, dvl = backward(cfg, x, o, lse, do)
    dx = inputs_cls(dq, dbk, dbv, dg, jnp.zeros_like(x.kb), dkl, dvl, _zero_cotangent(x.ml),
                    _zero_cotangent(x.ba), _zero_cotangent(x.la))
    return dx, _zero_cotangent(sel_list), _zero_cotangent(sel_count)

  core.defvjp(core_fwd, core_bwd)
  return core


_core = make_core(KernelInputs, _forward, _decode, _backward)


# ----------------------------------------------------------------------------- wrapper

def check_supported(q, blk_k, blk_v, local):
  arrays = (q, blk_k, blk_v) + (tuple(local[:2]) if local is not None else ())
  check_kernel_dtypes("block_retrieval_attention", *arrays)
  d, dv, c = q.shape[-1], blk_v.shape[-1], blk_k.shape[2]
  if max(d, dv, c) > MAX_DIM:
    raise NotImplementedError(f"block_retrieval_attention: the Pallas kernels need head dims and "
                              f"block size <= {MAX_DIM}, got d={d}, dv={dv}, C={c}")


def _pad_to(x, axis, n, value=0):
  if x.shape[axis] == n:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def block_retrieval_attention_pallas_gpu(q, blk_k, blk_v, gate, allowed, *, always=None, k=None,
                                         share="token_head", local=None, blk_mask=None,
                                         scale=None, chunk_size=64, decode=None,
                                         interpret=False, far=None):
  """Same contract as `block_retrieval_attention` (see the package docstring).

  chunk_size: the query tile tq (rounded down to a power of two in [16, 128]).
  decode: None (the decode kernel for Tq <= DECODE_MAX_QUERIES), True or False.
  """
  check_no_far(far)
  check_supported(q, blk_k, blk_v, local)
  B, T, H, d = q.shape
  N, C = blk_k.shape[1:3]
  dv = blk_v.shape[-1]
  scale = d ** -0.5 if scale is None else float(scale)
  dp, dvp, cp = max(16, pl.next_power_of_2(d)), max(16, pl.next_power_of_2(dv)), max(16, pl.next_power_of_2(C))
  tq = max(16, min(128, pl.next_power_of_2(T), 1 << (max(1, int(chunk_size)).bit_length() - 1)))
  tp = pl.cdiv(T, tq) * tq
  nq = tp // tq
  decode = T <= DECODE_MAX_QUERIES if decode is None else decode

  heads_major = lambda a: jnp.moveaxis(a, 2, 1)      # [B, T, H, x] -> [B, H, T, x]
  q_ = _pad_to(_pad_to(heads_major(q), 3, dp), 2, tp)
  blocks = lambda a, w: _pad_to(_pad_to(jnp.moveaxis(a, 3, 1), 3, cp), 4, w).reshape(
      B, H, N * cp, w)                                # [B, N, C, H, x] -> [B, H, N*Cp, w]
  bk_, bv_ = blocks(blk_k, dp), blocks(blk_v, dvp)
  valid = jnp.ones((B, N, C), bool) if blk_mask is None else blk_mask
  kb = jnp.where(_pad_to(valid, 2, cp, False), 0.0, NEG_INF).astype(f32).reshape(B, N * cp)

  sel = select_blocks(gate, allowed, always, k, share, H)               # [B, T, H, N]
  sel = _pad_to(jnp.moveaxis(sel, 2, 1), 2, tp, False)                  # [B, H, Tp, N]
  gate_h = _pad_to(jnp.moveaxis(jnp.broadcast_to(gate, (B, T, H, N)), 2, 1), 2, tp)
  g_ = jnp.where(sel, gate_h.astype(f32), NEG_INF)
  ba = jnp.any(sel.reshape(B, H, nq, tq, N), axis=3).astype(jnp.int32)

  if local is None:
    ts, ns = 16, 0
    kl_ = jnp.zeros((B, H, ts, dp), q.dtype)
    vl_ = jnp.zeros((B, H, ts, dvp), blk_v.dtype)
    ml_ = jnp.zeros((B, tp, ts), jnp.int8)
  else:
    k_loc, v_loc, m_loc = local
    S = k_loc.shape[1]
    ts = max(16, min(LOCAL_TILE, pl.next_power_of_2(S)))
    sp = pl.cdiv(S, ts) * ts
    ns = sp // ts
    kl_ = _pad_to(_pad_to(heads_major(k_loc), 3, dp), 2, sp)
    vl_ = _pad_to(_pad_to(heads_major(v_loc), 3, dvp), 2, sp)
    ml_ = _pad_to(_pad_to(m_loc, 2, sp, False), 1, tp, False).astype(jnp.int8)
  la = jnp.any(ml_.reshape(B, nq, tq, -1, ts) > 0, axis=(2, 4)).astype(jnp.int32)

  if decode:   # the selected block ids of each row first (ascending), and their count
    sel_list = jnp.argsort(~sel, axis=-1, stable=True).astype(jnp.int32)
    sel_count = jnp.sum(sel, axis=-1, dtype=jnp.int32)
  else:
    sel_list = sel_count = jnp.zeros((), jnp.int32)
  cfg = Cfg(scale=scale, tq=tq, cp=cp, ts=ts, ns=ns, t=T, decode=bool(decode),
            interpret=interpret)
  x = KernelInputs(q_, bk_, bv_, g_, kb, kl_, vl_, ml_, ba, la)
  o = _core(cfg, x, sel_list, sel_count)                 # [B, H, Tp, dvp]
  return jnp.moveaxis(o[:, :, :T, :dv], 1, 2)
