"""Block-retrieval attention as Pallas TPU (Mosaic) kernels.

Same math, layout and custom VJP as `pallas_gpu` (whose docstring gives the equations), in the
TPU flash-attention shape: the KV axis is the last grid axis ("arbitrary"), its blocks are
pipelined into VMEM by BlockSpecs, and the running statistics live in VMEM scratch:

  forward   grid (B, H, Tq/tq, N + S/ts): steps j < N visit block j, the rest the local key tiles;
            a step whose tile reads nothing (the per-tile flags, in SMEM) does no work.
  backward  dq/dgate: the same grid, dq and the [tq, N] gate gradient accumulated in scratch;
            dk/dv: grids (B, H, N, Tq/tq) for the blocks and (B, H, S/ts, Tq/tq) for the local keys.
  decode    grid (B, H, Tq, N + S/ts) with each row's compacted selection list and its count
            scalar-prefetched: the index maps fetch block list[j] (a step past the count re-uses
            the last fetched block, so no DMA is issued) and only selected blocks are read, as in
            the TPU paged-attention kernel.

Choices and limits [ours; checked in interpret mode and through the Mosaic lowering on CPU, not
yet on a TPU]:
- d and dv are zero-padded to multiples of 128 (lanes), C to a multiple of 8 (sublanes), the query
  tile tq is a multiple of 8 and the local tile ts = 128; masks travel as int32.
- The training kernels skip the *compute* of unselected blocks but their tiles are still DMA'd
  (the index maps do not consult the selection); only the decode kernel avoids the reads.
- m and l are kept [tq, 128] lane-replicated in scratch, as in jax's TPU flash attention.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import tile_dot as _dot
from pallas_kernels.block_retrieval_attention._common import NEG_INF, check_no_far, select_blocks
from pallas_kernels.block_retrieval_attention.pallas_gpu import (
  DECODE_MAX_QUERIES,
  _block_logits,
  _local_logits,
  _online,
  check_supported,
  make_core,
)

LOCAL_TILE = 128
LANES = 128
f32 = jnp.float32


class Cfg(NamedTuple):
  scale: float
  tq: int
  cp: int
  ts: int
  n: int            # blocks
  ns: int           # local key tiles (0: no local part)
  t: int            # true number of queries
  decode: bool
  interpret: bool


class KernelInputs(NamedTuple):
  """TPU layout: like pallas_gpu.KernelInputs with blocks and local tiles on their own axes."""
  q: jax.Array     # [B, H, Tp, dp]
  bk: jax.Array    # [B, H, N, Cp, dp]
  bv: jax.Array    # [B, H, N, Cp, dvp]
  g: jax.Array     # [B, H, Tp, N] float32 (NEG_INF: not selected)
  kb: jax.Array    # [B, N, 1, Cp] float32 key bias
  kl: jax.Array    # [B, H, ns, ts, dp]
  vl: jax.Array    # [B, H, ns, ts, dvp]
  ml: jax.Array    # [B, Tp, Sp] int32
  ba: jax.Array    # [B, H, nq, 1, N] int32 tile reads block
  la: jax.Array    # [B, nq, 1, ns] int32 tile sees local tile


def _interpret(interpret):
  """interpret=True runs Pallas' generic interpreter (these kernels move data only through
  BlockSpecs, which it models); pass `pltpu.InterpretParams()` for the TPU-faithful one."""
  return interpret


def _column(a, j):
  lane = lax.broadcasted_iota(jnp.int32, a.shape, 1)
  return jnp.sum(jnp.where(lane == j, a, 0.0), axis=1, keepdims=True)


def _params(*sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


def _clamp(j, lo, hi):
  return jnp.minimum(jnp.maximum(j, lo), hi)


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, bk_ref, bv_ref, g_ref, kb_ref, kl_ref, vl_ref, ml_ref, ba_ref, la_ref,
                o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: Cfg):
  j, n = pl.program_id(3), cfg.n

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, f32)
    l_scr[...] = jnp.zeros(l_scr.shape, f32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, f32)

  def step(e, valid, v):
    m, l, acc = _online((m_scr[:, :1], l_scr[:, :1], acc_scr[...]), e, valid, v)
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  @pl.when((j < n) & (ba_ref[0, jnp.minimum(j, n - 1)] > 0))
  def _():
    e, valid, _ = _block_logits(q_ref[...], bk_ref[...], kb_ref[...], _column(g_ref[...], j),
                                cfg.scale)
    step(e, valid, bv_ref[...])

  if cfg.ns:
    @pl.when((j >= n) & (la_ref[0, _clamp(j - n, 0, cfg.ns - 1)] > 0))
    def _():
      e, valid = _local_logits(q_ref[...], kl_ref[...], ml_ref[...], cfg.scale)
      step(e, valid, vl_ref[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l, m = l_scr[:, :1], m_scr[:, :1]
    ok = l > 0
    l = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok, acc_scr[...] / l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log(l), NEG_INF)


def _q_grid_specs(cfg: Cfg, x: KernelInputs):
  """In-specs of the kernels on grid (B, H, nq, N + ns)."""
  n, ns, tq = cfg.n, max(cfg.ns, 1), cfg.tq
  dp, dvp, cp, ts = x.q.shape[-1], x.bv.shape[-1], cfg.cp, cfg.ts
  blk = lambda j: jnp.minimum(j, n - 1)
  loc = lambda j: _clamp(j - n, 0, ns - 1)
  tile = lambda w: pl.BlockSpec((None, None, tq, w), lambda b, h, i, j: (b, h, i, 0))
  kv = lambda w: pl.BlockSpec((None, None, None, cp, w), lambda b, h, i, j: (b, h, blk(j), 0, 0))
  lkv = lambda w: pl.BlockSpec((None, None, None, ts, w), lambda b, h, i, j: (b, h, loc(j), 0, 0))
  return [tile(dp), kv(dp), kv(dvp), tile(n),
          pl.BlockSpec((None, None, 1, cp), lambda b, h, i, j: (b, blk(j), 0, 0)),
          lkv(dp), lkv(dvp),
          pl.BlockSpec((None, tq, ts), lambda b, h, i, j: (b, i, loc(j))),
          pl.BlockSpec((None, None, None, 1, n), lambda b, h, i, j: (b, h, i, 0, 0),
                       memory_space=pltpu.SMEM),
          pl.BlockSpec((None, None, 1, ns), lambda b, h, i, j: (b, i, 0, 0),
                       memory_space=pltpu.SMEM)]


def _forward(cfg: Cfg, x: KernelInputs):
  B, H, Tp, _ = x.q.shape
  dvp, tq = x.bv.shape[-1], cfg.tq
  tile = lambda w: pl.BlockSpec((None, None, tq, w), lambda b, h, i, j: (b, h, i, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(B, H, Tp // tq, cfg.n + cfg.ns),
      in_specs=_q_grid_specs(cfg, x),
      out_specs=[tile(dvp), tile(1)],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dvp), x.q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, 1), f32)],
      scratch_shapes=[pltpu.VMEM((tq, LANES), f32), pltpu.VMEM((tq, LANES), f32),
                      pltpu.VMEM((tq, dvp), f32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=_interpret(cfg.interpret), name="block_retrieval_attention_fwd_tpu",
  )(*x)


# ----------------------------------------------------------------------------- decode

def _decode_kernel(lst_ref, cnt_ref, q_ref, bk_ref, bv_ref, g_ref, kb_ref, kl_ref, vl_ref, ml_ref,
                   o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: Cfg):
  b, h, t, j = (pl.program_id(a) for a in range(4))
  n = cfg.n

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, f32)
    l_scr[...] = jnp.zeros(l_scr.shape, f32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, f32)

  def step(e, valid, v):
    m, l, acc = _online((m_scr[:, :1], l_scr[:, :1], acc_scr[...]), e, valid, v)
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  @pl.when(j < cnt_ref[b, h, t])
  def _():
    blk = lst_ref[b, h, t, jnp.minimum(j, n - 1)]
    e, valid, _ = _block_logits(q_ref[...], bk_ref[...], kb_ref[...], _column(g_ref[...], blk),
                                cfg.scale)
    step(e, valid, bv_ref[...])

  if cfg.ns:
    @pl.when(j >= n)
    def _():
      e, valid = _local_logits(q_ref[...], kl_ref[...], ml_ref[...], cfg.scale)
      step(e, valid, vl_ref[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l, m = l_scr[:, :1], m_scr[:, :1]
    ok = l > 0
    l = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok, acc_scr[...] / l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log(l), NEG_INF)


def _decode(cfg: Cfg, x: KernelInputs, sel_list, sel_count):
  """One query row per (b, h, t < T), repeated to 8 sublanes (row 0 is the query); the padding
  rows up to Tp get o = 0, LSE = NEG_INF."""
  B, H, Tp, dp = x.q.shape
  dvp, cp, ts, n, ns = x.bv.shape[-1], cfg.cp, cfg.ts, cfg.n, max(cfg.ns, 1)
  rep = lambda a: jnp.broadcast_to(a[:, :, :, None], a.shape[:3] + (8,) + a.shape[3:])
  q8, g8 = rep(x.q), rep(x.g)                                   # [B, H, Tp, 8, .]
  ml8 = jnp.broadcast_to(x.ml[:, :, None], (B, Tp, 8, x.ml.shape[-1]))

  def blk(b, h, t, j, lst, cnt):   # past the count: stay on the last fetched block (no DMA)
    last = jnp.maximum(cnt[b, h, t] - 1, 0)
    return lst[b, h, t, jnp.minimum(j, last)]

  loc = lambda j: _clamp(j - n, 0, ns - 1)
  row = lambda w: pl.BlockSpec((None, None, None, 8, w), lambda b, h, t, j, *_: (b, h, t, 0, 0))
  kv = lambda w: pl.BlockSpec((None, None, None, cp, w),
                              lambda b, h, t, j, lst, cnt: (b, h, blk(b, h, t, j, lst, cnt), 0, 0))
  lkv = lambda w: pl.BlockSpec((None, None, None, ts, w),
                               lambda b, h, t, j, *_: (b, h, loc(j), 0, 0))
  o, lse = pl.pallas_call(
      functools.partial(_decode_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(B, H, cfg.t, n + cfg.ns),
          in_specs=[row(dp), kv(dp), kv(dvp), row(n),
                    pl.BlockSpec((None, None, 1, cp),
                                 lambda b, h, t, j, lst, cnt: (b, blk(b, h, t, j, lst, cnt), 0, 0)),
                    lkv(dp), lkv(dvp),
                    pl.BlockSpec((None, None, 8, ts), lambda b, h, t, j, *_: (b, t, 0, loc(j)))],
          out_specs=[row(dvp), row(1)],
          scratch_shapes=[pltpu.VMEM((8, LANES), f32), pltpu.VMEM((8, LANES), f32),
                          pltpu.VMEM((8, dvp), f32)]),
      out_shape=[jax.ShapeDtypeStruct((B, H, cfg.t, 8, dvp), x.q.dtype),
                 jax.ShapeDtypeStruct((B, H, cfg.t, 8, 1), f32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=_interpret(cfg.interpret), name="block_retrieval_attention_decode_tpu",
  )(sel_list, sel_count, q8, x.bk, x.bv, g8, x.kb, x.kl, x.vl, ml8)
  return _pad_to(o[:, :, :, 0], 2, Tp), _pad_to(lse[:, :, :, 0], 2, Tp, NEG_INF)


# ----------------------------------------------------------------------------- backward

def _dq_kernel(q_ref, bk_ref, bv_ref, g_ref, kb_ref, kl_ref, vl_ref, ml_ref, ba_ref, la_ref,
               do_ref, lse_ref, dl_ref, dq_ref, dg_ref, dq_scr, dg_scr, *, cfg: Cfg):
  j, n = pl.program_id(3), cfg.n
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, f32)
    dg_scr[...] = jnp.zeros(dg_scr.shape, f32)

  @pl.when((j < n) & (ba_ref[0, jnp.minimum(j, n - 1)] > 0))
  def _():
    k, v = bk_ref[...], bv_ref[...]
    e, valid, w = _block_logits(q, k, kb_ref[...], _column(g_ref[...], j), cfg.scale)
    p = jnp.where(valid, jnp.exp(e - lse), 0.0)
    de = p * (_dot(do, v, tb=True) - delta)
    dg = jnp.sum(de, axis=1, keepdims=True)
    dq_scr[...] += _dot((de - w * dg).astype(k.dtype), k) * cfg.scale
    lane = lax.broadcasted_iota(jnp.int32, dg_scr.shape, 1)
    dg_scr[...] = jnp.where(lane == j, dg, dg_scr[...])

  if cfg.ns:
    @pl.when((j >= n) & (la_ref[0, _clamp(j - n, 0, cfg.ns - 1)] > 0))
    def _():
      k = kl_ref[...]
      e, valid = _local_logits(q, k, ml_ref[...], cfg.scale)
      p = jnp.where(valid, jnp.exp(e - lse), 0.0)
      de = p * (_dot(do, vl_ref[...], tb=True) - delta)
      dq_scr[...] += _dot(de.astype(k.dtype), k) * cfg.scale

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)
    dg_ref[...] = dg_scr[...]


def _dkv_block_kernel(q_ref, k_ref, v_ref, g_ref, kb_ref, ba_ref, do_ref, lse_ref, dl_ref,
                      dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: Cfg):
  n, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, f32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, f32)

  @pl.when(ba_ref[0, n] > 0)
  def _():
    q, do = q_ref[...], do_ref[...]
    e, valid, w = _block_logits(q, k_ref[...], kb_ref[...], _column(g_ref[...], n), cfg.scale)
    p = jnp.where(valid, jnp.exp(e - lse_ref[...]), 0.0)
    de = p * (_dot(do, v_ref[...], tb=True) - dl_ref[...])
    ds = de - w * jnp.sum(de, axis=1, keepdims=True)
    dk_scr[...] += _dot(ds.astype(q.dtype), q, ta=True) * cfg.scale
    dv_scr[...] += _dot(p.astype(do.dtype), do, ta=True)

  @pl.when(i == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv_local_kernel(q_ref, k_ref, v_ref, ml_ref, la_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref,
                      dk_scr, dv_scr, *, cfg: Cfg):
  jl, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, f32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, f32)

  @pl.when(la_ref[0, jl] > 0)
  def _():
    q, do, k = q_ref[...], do_ref[...], k_ref[...]
    e, valid = _local_logits(q, k, ml_ref[...], cfg.scale)
    p = jnp.where(valid, jnp.exp(e - lse_ref[...]), 0.0)
    de = p * (_dot(do, v_ref[...], tb=True) - dl_ref[...])
    dk_scr[...] += _dot(de.astype(q.dtype), q, ta=True) * cfg.scale
    dv_scr[...] += _dot(p.astype(do.dtype), do, ta=True)

  @pl.when(i == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(cfg: Cfg, x: KernelInputs, o, lse, do):
  B, H, Tp, dp = x.q.shape
  n, dvp, tq, cp, ts = cfg.n, x.bv.shape[-1], cfg.tq, cfg.cp, cfg.ts
  nq = Tp // tq
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)   # [B, H, Tp, 1]
  tile = lambda w: pl.BlockSpec((None, None, tq, w), lambda b, h, i, j: (b, h, i, 0))
  dq, dg = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(B, H, nq, n + cfg.ns),
      in_specs=_q_grid_specs(cfg, x) + [tile(dvp), tile(1), tile(1)],
      out_specs=[tile(dp), tile(n)],
      out_shape=[jax.ShapeDtypeStruct(x.q.shape, x.q.dtype), jax.ShapeDtypeStruct(x.g.shape, f32)],
      scratch_shapes=[pltpu.VMEM((tq, dp), f32), pltpu.VMEM((tq, n), f32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=_interpret(cfg.interpret), name="block_retrieval_attention_dq_tpu",
  )(*x, do, lse, delta)

  # dk/dv: grid (B, H, kv tile, query tile), query tiles last.
  qt = lambda w: pl.BlockSpec((None, None, tq, w), lambda b, h, kv, i: (b, h, i, 0))
  own = lambda rows, w: pl.BlockSpec((None, None, None, rows, w),
                                     lambda b, h, kv, i: (b, h, kv, 0, 0))
  dbk, dbv = pl.pallas_call(
      functools.partial(_dkv_block_kernel, cfg=cfg),
      grid=(B, H, n, nq),
      in_specs=[qt(dp), own(cp, dp), own(cp, dvp), qt(n),
                pl.BlockSpec((None, None, 1, cp), lambda b, h, kv, i: (b, kv, 0, 0)),
                pl.BlockSpec((None, None, None, 1, n), lambda b, h, kv, i: (b, h, i, 0, 0),
                             memory_space=pltpu.SMEM),
                qt(dvp), qt(1), qt(1)],
      out_specs=[own(cp, dp), own(cp, dvp)],
      out_shape=[jax.ShapeDtypeStruct(x.bk.shape, x.bk.dtype),
                 jax.ShapeDtypeStruct(x.bv.shape, x.bv.dtype)],
      scratch_shapes=[pltpu.VMEM((cp, dp), f32), pltpu.VMEM((cp, dvp), f32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=_interpret(cfg.interpret), name="block_retrieval_attention_dkv_blocks_tpu",
  )(x.q, x.bk, x.bv, x.g, x.kb, x.ba, do, lse, delta)

  if not cfg.ns:
    return dq, dbk, dbv, dg, jnp.zeros_like(x.kl), jnp.zeros_like(x.vl)
  dkl, dvl = pl.pallas_call(
      functools.partial(_dkv_local_kernel, cfg=cfg),
      grid=(B, H, cfg.ns, nq),
      in_specs=[qt(dp), own(ts, dp), own(ts, dvp),
                pl.BlockSpec((None, tq, ts), lambda b, h, kv, i: (b, i, kv)),
                pl.BlockSpec((None, None, 1, cfg.ns), lambda b, h, kv, i: (b, i, 0, 0),
                             memory_space=pltpu.SMEM),
                qt(dvp), qt(1), qt(1)],
      out_specs=[own(ts, dp), own(ts, dvp)],
      out_shape=[jax.ShapeDtypeStruct(x.kl.shape, x.kl.dtype),
                 jax.ShapeDtypeStruct(x.vl.shape, x.vl.dtype)],
      scratch_shapes=[pltpu.VMEM((ts, dp), f32), pltpu.VMEM((ts, dvp), f32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=_interpret(cfg.interpret), name="block_retrieval_attention_dkv_local_tpu",
  )(x.q, x.kl, x.vl, x.ml, x.la, do, lse, delta)
  return dq, dbk, dbv, dg, dkl, dvl


# ----------------------------------------------------------------------------- custom VJP

_core = make_core(KernelInputs, _forward, _decode, _backward)


# ----------------------------------------------------------------------------- wrapper

def _pad_to(x, axis, n, value=0):
  if x.shape[axis] == n:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _round_up(n, m):
  return pl.cdiv(n, m) * m


def block_retrieval_attention_pallas_tpu(q, blk_k, blk_v, gate, allowed, *, always=None, k=None,
                                         share="token_head", local=None, blk_mask=None,
                                         scale=None, chunk_size=128, decode=None,
                                         interpret=False, far=None):
  """Same contract as `block_retrieval_attention`; chunk_size is the query tile (a multiple of 8,
  at most 512); decode as in `pallas_gpu`."""
  check_no_far(far)
  check_supported(q, blk_k, blk_v, local)
  B, T, H, d = q.shape
  N, C = blk_k.shape[1:3]
  dv = blk_v.shape[-1]
  scale = d ** -0.5 if scale is None else float(scale)
  dp, dvp, cp = _round_up(d, LANES), _round_up(dv, LANES), _round_up(C, 8)
  tq = min(_round_up(T, 8), _round_up(max(8, min(int(chunk_size), 512)), 8))
  tp = _round_up(T, tq)
  nq = tp // tq
  decode = T <= DECODE_MAX_QUERIES if decode is None else decode

  heads_major = lambda a: jnp.moveaxis(a, 2, 1)
  q_ = _pad_to(_pad_to(heads_major(q), 3, dp), 2, tp)
  blocks = lambda a, w: _pad_to(_pad_to(jnp.moveaxis(a, 3, 1), 3, cp), 4, w)   # [B,H,N,Cp,w]
  bk_, bv_ = blocks(blk_k, dp), blocks(blk_v, dvp)
  valid = jnp.ones((B, N, C), bool) if blk_mask is None else blk_mask
  kb = jnp.where(_pad_to(valid, 2, cp, False), 0.0, NEG_INF).astype(f32)[:, :, None, :]

  sel = select_blocks(gate, allowed, always, k, share, H)
  sel = _pad_to(jnp.moveaxis(sel, 2, 1), 2, tp, False)                        # [B, H, Tp, N]
  gate_h = _pad_to(jnp.moveaxis(jnp.broadcast_to(gate, (B, T, H, N)), 2, 1), 2, tp)
  g_ = jnp.where(sel, gate_h.astype(f32), NEG_INF)
  ba = jnp.any(sel.reshape(B, H, nq, tq, N), axis=3).astype(jnp.int32)[:, :, :, None, :]

  ts = LOCAL_TILE
  if local is None:
    ns = 0
    kl_ = jnp.zeros((B, H, 1, ts, dp), q.dtype)
    vl_ = jnp.zeros((B, H, 1, ts, dvp), blk_v.dtype)
    ml_ = jnp.zeros((B, tp, ts), jnp.int32)
  else:
    k_loc, v_loc, m_loc = local
    sp = _round_up(k_loc.shape[1], ts)
    ns = sp // ts
    tiles = lambda a, w: _pad_to(_pad_to(heads_major(a), 3, w), 2, sp).reshape(B, H, ns, ts, w)
    kl_, vl_ = tiles(k_loc, dp), tiles(v_loc, dvp)
    ml_ = _pad_to(_pad_to(m_loc, 2, sp, False), 1, tp, False).astype(jnp.int32)
  la = jnp.any(ml_.reshape(B, nq, tq, -1, ts) > 0, axis=(2, 4)).astype(jnp.int32)[:, :, None, :]

  if decode:
    sel_list = jnp.argsort(~sel, axis=-1, stable=True).astype(jnp.int32)
    sel_count = jnp.sum(sel, axis=-1, dtype=jnp.int32)
  else:
    sel_list = sel_count = jnp.zeros((), jnp.int32)
  cfg = Cfg(scale=scale, tq=tq, cp=cp, ts=ts, n=N, ns=ns, t=T, decode=bool(decode),
            interpret=interpret)
  x = KernelInputs(q_, bk_, bv_, g_, kb, kl_, vl_, ml_, ba, la)
  o = _core(cfg, x, sel_list, sel_count)
  return jnp.moveaxis(o[:, :, :T, :dv], 1, 2)

