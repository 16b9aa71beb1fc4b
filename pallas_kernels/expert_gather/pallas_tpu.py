"""Expert gathers as Pallas TPU (Mosaic) kernels.

Mosaic has no general VMEM gather, so rows travel by DMA. The tables stay in HBM
(`memory_space=pl.ANY`); each grid step handles BT tokens, reads their indices as scalars from SMEM
and copies the BT x K selected rows into VMEM with `pltpu.make_async_copy`, KC slots at a time and
double-buffered (the copies of slot chunk c+1 are in flight while chunk c is summed). Same math and
custom VJPs as `pallas_gpu` (whose docstring lists the equations):

  forward   gather_sum (PKM) or the fused PEER / UltraMemV2 mlp (z saved as the residual)
  backward  gather_dot (dw of the gather) or the fused mlp token pass (dx, dw and the table-gradient
            coefficients), then the table gradients by a CSR segment sum: XLA sorts the entries by
            row; one program per RB rows DMAs its contiguous run of sorted (row, token, coef)
            entries into SMEM, EB at a time, DMAs the x[token] rows into VMEM and adds
            coef * x[token] to its float32 accumulator row. Rows are written once, deterministic.

Choices and limits [ours; none of this has run on a TPU yet, only in interpret mode and through
the Mosaic lowering on CPU]:
- "Scalar-prefetched indices": the indices reach SMEM through per-step SMEM BlockSpecs (the
  pipeline prefetches the next step's block) rather than one `PrefetchScalarGridSpec` operand:
  T*K indices (1M at T = 8192, K = 128) do not fit SMEM whole. Likewise the CSR bounds.
- One DMA per row (D * itemsize bytes, 2 KiB at D = 512 in f32): descriptor issue rate, not HBM
  bandwidth, is the likely limit; bf16 tables put single rows into sublane-packed tiles, which
  Mosaic may handle slower than 32-bit rows [unverified].
- The segment sum is not double-buffered and adds one entry at a time (a dynamic-row update of
  the accumulator), so hot rows serialise; the GPU kernel uses a one-hot matmul instead.
- float32 accumulation; float64 raises NotImplementedError (dispatch falls back to `xla`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.expert_gather.pallas_gpu import act_and_grad, check_supported

BLOCK_T = 8         # BT: tokens per grid step (one sublane tile)
SLOT_CHUNK = 8      # KC: slots whose rows are fetched per double-buffer stage
ROW_BLOCK = 8       # RB: table rows per segment-sum program
ENTRY_BLOCK = 64    # EB: sorted entries fetched per segment-sum step
f32 = jnp.float32


def _interpret(interpret):
  return pltpu.InterpretParams() if interpret is True else interpret


# ----------------------------------------------------------------------------- token kernels

def _gathered_slots(idx_ref, tables, bufs, sem, *, K, body, carry):
  """carry = body(k, [table[idx[t, k]] for t in the block] per table, carry) for k = 0..K-1.

  idx_ref: SMEM [1, BT * K] (token-major); tables: HBM refs; bufs: VMEM [2, KC, BT, D] per table;
  sem: DMA semaphores (2,), one per buffer slot.
  """
  nkc = K // SLOT_CHUNK

  def issue(c, slot, start: bool):
    def one(j, _):
      kk, t = lax.div(j, BLOCK_T), lax.rem(j, BLOCK_T)
      row = idx_ref[0, t * K + c * SLOT_CHUNK + kk]
      for tab, buf in zip(tables, bufs):
        cp = pltpu.make_async_copy(tab.at[pl.ds(row, 1)], buf.at[slot, kk, pl.ds(t, 1)],
                                   sem.at[slot])
        cp.start() if start else cp.wait()
      return 0
    lax.fori_loop(0, SLOT_CHUNK * BLOCK_T, one, 0)

  issue(0, 0, True)

  def chunk(c, carry):
    slot = lax.rem(c, 2)
    issue(c, slot, False)

    @pl.when(c + 1 < nkc)
    def _():
      issue(c + 1, 1 - slot, True)

    def slot_k(kk, carry):
      return body(c * SLOT_CHUNK + kk, [buf[slot, kk].astype(f32) for buf in bufs], carry)
    return lax.fori_loop(0, SLOT_CHUNK, slot_k, carry)

  return lax.fori_loop(0, nkc, chunk, carry)


def _column(a_TK, k):
  """a[:, k] as a [BT, 1] column, k dynamic (a lane mask and a lane reduction)."""
  lane = lax.broadcasted_iota(jnp.int32, a_TK.shape, 1)
  return jnp.sum(jnp.where(lane == k, a_TK, 0.0), axis=1, keepdims=True)


def _put_column(a_TK, k, col):
  lane = lax.broadcasted_iota(jnp.int32, a_TK.shape, 1)
  return jnp.where(lane == k, col, a_TK)


def _gather_sum_kernel(idx_ref, w_ref, tab, y_ref, buf, sem, *, K):
  w = w_ref[...].astype(f32)
  body = lambda k, rows, acc: acc + _column(w, k) * rows[0]
  y = _gathered_slots(idx_ref, [tab], [buf], sem, K=K, body=body,
                      carry=jnp.zeros(y_ref.shape, f32))
  y_ref[...] = y.astype(y_ref.dtype)


def _gather_dot_kernel(idx_ref, x_ref, tab, z_ref, buf, sem, *, K):
  x = x_ref[...].astype(f32)
  body = lambda k, rows, z: _put_column(z, k, jnp.sum(x * rows[0], axis=1, keepdims=True))
  z_ref[...] = _gathered_slots(idx_ref, [tab], [buf], sem, K=K, body=body,
                               carry=jnp.zeros(z_ref.shape, f32))


def _mlp_fwd_kernel(idx_ref, w_ref, x_ref, down, up, y_ref, z_ref, dbuf, ubuf, sem, *, K, act):
  x, w = x_ref[...].astype(f32), w_ref[...].astype(f32)

  def body(k, rows, carry):
    y, z = carry
    zk = jnp.sum(x * rows[0], axis=1, keepdims=True)
    return y + _column(w, k) * act_and_grad(act, zk)[0] * rows[1], _put_column(z, k, zk)

  y, z = _gathered_slots(idx_ref, [down, up], [dbuf, ubuf], sem, K=K, body=body,
                         carry=(jnp.zeros(y_ref.shape, f32), jnp.zeros(z_ref.shape, f32)))
  y_ref[...] = y.astype(y_ref.dtype)
  z_ref[...] = z


def _mlp_bwd_kernel(idx_ref, w_ref, z_ref, dy_ref, down, up, dx_ref, dw_ref, cu_ref, cd_ref,
                    dbuf, ubuf, sem, *, K, act):
  dy, w, z = dy_ref[...].astype(f32), w_ref[...].astype(f32), z_ref[...]
  a, da = act_and_grad(act, z)                               # [BT, Kp]

  def body(k, rows, carry):
    dx, r_all = carry
    r = jnp.sum(dy * rows[1], axis=1, keepdims=True)         # dL/d(coef)
    dz = _column(w, k) * r * _column(da, k)
    return dx + dz * rows[0], _put_column(r_all, k, r)

  dx, r = _gathered_slots(idx_ref, [down, up], [dbuf, ubuf], sem, K=K, body=body,
                          carry=(jnp.zeros(dx_ref.shape, f32), jnp.zeros(z.shape, f32)))
  dx_ref[...] = dx.astype(dx_ref.dtype)
  dw_ref[...] = (a * r).astype(dw_ref.dtype)
  cu_ref[...] = w * a
  cd_ref[...] = w * r * da


def _token_call(kernel, *, tp, kp, ins, in_specs, outs, tables, interpret, name):
  """Grid over token blocks: idx (SMEM, [Tp/BT, 1, BT*Kp]) first, then `ins` (VMEM blocks along
  tokens), then the HBM tables; outputs `outs` are [Tp, width]; VMEM row buffers per table."""
  tok = lambda w: pl.BlockSpec((BLOCK_T, w), lambda i: (i, 0))
  return pl.pallas_call(
      kernel, grid=(tp // BLOCK_T,),
      in_specs=[pl.BlockSpec((None, 1, BLOCK_T * kp), lambda i: (i, 0, 0),
                             memory_space=pltpu.SMEM)]
      + [tok(w) for w in in_specs] + [pl.BlockSpec(memory_space=pl.ANY)] * len(tables),
      out_specs=[tok(o.shape[1]) for o in outs],
      out_shape=outs,
      scratch_shapes=[pltpu.VMEM((2, SLOT_CHUNK, BLOCK_T, t.shape[1]), t.dtype) for t in tables]
      + [pltpu.SemaphoreType.DMA((2,))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=_interpret(interpret), name=name,
  )(*ins, *tables)


# ----------------------------------------------------------------------------- table gradient

class SortedEntries(NamedTuple):
  rows: jax.Array     # [1, E + EB] int32 sorted rows (padded; 2-D: Mosaic wants rank >= 2)
  tokens: jax.Array   # [1, E + EB] int32
  order: jax.Array    # [E]
  bounds: jax.Array   # [num_row_blocks, 1, 2] int32: [first, end) entry of each row block


def sort_entries(idx_TK, num_rows) -> SortedEntries:
  flat = idx_TK.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  rows = flat[order]
  nb = pl.cdiv(num_rows, ROW_BLOCK)
  start = jnp.searchsorted(rows, jnp.arange(nb + 1, dtype=jnp.int32) * ROW_BLOCK,
                           side="left").astype(jnp.int32)
  pad = lambda a: jnp.concatenate([a, jnp.zeros((ENTRY_BLOCK,), jnp.int32)])[None]
  tokens = (order // idx_TK.shape[1]).astype(jnp.int32)
  return SortedEntries(pad(rows), pad(tokens), order,
                       jnp.stack([start[:-1], start[1:]], 1)[:, None, :])


def _segment_sum_kernel(bounds_ref, rows_hbm, tok_hbm, coef_hbm, x_hbm, g_ref, rows_s, tok_s,
                        coef_s, xbuf, acc, sem):
  rb = pl.program_id(0) * ROW_BLOCK
  lo, hi = bounds_ref[0, 0], bounds_ref[0, 1]
  acc[...] = jnp.zeros(acc.shape, f32)

  def step(c, _):
    e0 = lo + c * ENTRY_BLOCK
    meta = [pltpu.make_async_copy(src.at[:, pl.ds(e0, ENTRY_BLOCK)], dst, sem.at[0])
            for src, dst in ((rows_hbm, rows_s), (tok_hbm, tok_s), (coef_hbm, coef_s))]
    for cp in meta:
      cp.start()
    for cp in meta:
      cp.wait()
    m = jnp.minimum(ENTRY_BLOCK, hi - e0)
    row_copy = lambda j: pltpu.make_async_copy(x_hbm.at[pl.ds(tok_s[0, j], 1)],
                                               xbuf.at[pl.ds(j, 1)], sem.at[1])

    def start(j, _):
      row_copy(j).start()
      return 0

    def wait(j, _):   # all copies share the semaphore: use the rows only once every one landed
      row_copy(j).wait()
      return 0

    def add(j, _):
      r = rows_s[0, j] - rb
      acc[pl.ds(r, 1), :] += coef_s[0, j] * xbuf[pl.ds(j, 1), :].astype(f32)
      return 0

    lax.fori_loop(0, m, start, 0)
    lax.fori_loop(0, m, wait, 0)
    lax.fori_loop(0, m, add, 0)
    return 0

  lax.fori_loop(0, lax.div(hi - lo + ENTRY_BLOCK - 1, ENTRY_BLOCK), step, 0)
  g_ref[...] = acc[...].astype(g_ref.dtype)


def segment_sum(entries: SortedEntries, coef_TK, x_TD, num_rows, out_dtype, *, interpret):
  """G [N, D]: G[n] = sum over entries with row n of coef * x[token]."""
  D = x_TD.shape[1]
  coef = jnp.concatenate([coef_TK.reshape(-1)[entries.order].astype(f32),
                          jnp.zeros((ENTRY_BLOCK,), f32)])[None]
  nb = entries.bounds.shape[0]
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
      _segment_sum_kernel, grid=(nb,),
      in_specs=[pl.BlockSpec((None, 1, 2), lambda r: (r, 0, 0), memory_space=pltpu.SMEM)]
      + [hbm] * 4,
      out_specs=pl.BlockSpec((ROW_BLOCK, D), lambda r: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((nb * ROW_BLOCK, D), out_dtype),
      scratch_shapes=[pltpu.SMEM((1, ENTRY_BLOCK), jnp.int32),
                      pltpu.SMEM((1, ENTRY_BLOCK), jnp.int32), pltpu.SMEM((1, ENTRY_BLOCK), f32),
                      pltpu.VMEM((ENTRY_BLOCK, D), x_TD.dtype),
                      pltpu.VMEM((ROW_BLOCK, D), f32), pltpu.SemaphoreType.DMA((2,))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=_interpret(interpret), name="expert_segment_sum_tpu",
  )(entries.bounds, entries.rows, entries.tokens, coef, x_TD)[:num_rows]


# ----------------------------------------------------------------------------- custom VJPs

class Cfg(NamedTuple):
  interpret: object
  act: str = "identity"


def _pad(a, tp, kp=None):
  """[T, K] or [T, D] -> zero-padded [Tp, Kp] (padded slots and tokens have weight 0)."""
  pads = [(0, tp - a.shape[0]), (0, 0 if kp is None else kp - a.shape[1])]
  return a if all(p == (0, 0) for p in pads) else jnp.pad(a, pads)


def _sizes(idx_TK):
  t, k = idx_TK.shape
  return pl.cdiv(t, BLOCK_T) * BLOCK_T, pl.cdiv(k, SLOT_CHUNK) * SLOT_CHUNK


def _idx_blocks(idx_TK, tp, kp):   # SMEM operand: one row of BT * Kp indices per grid step
  return _pad(idx_TK.astype(jnp.int32), tp, kp).reshape(tp // BLOCK_T, 1, BLOCK_T * kp)


def _int_cotangent(a):
  return np.zeros(a.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather(cfg, table_ND, idx_TK, w_TK):
  return _gather_fwd(cfg, table_ND, idx_TK, w_TK)[0]


def _gather_fwd(cfg, table_ND, idx_TK, w_TK):
  (t, _), (tp, kp) = idx_TK.shape, _sizes(idx_TK)
  (y,) = _token_call(
      functools.partial(_gather_sum_kernel, K=kp), tp=tp, kp=kp,
      ins=(_idx_blocks(idx_TK, tp, kp), _pad(w_TK, tp, kp)), in_specs=(kp,),
      outs=[jax.ShapeDtypeStruct((tp, table_ND.shape[1]), w_TK.dtype)], tables=(table_ND,),
      interpret=cfg.interpret, name="expert_gather_sum_tpu")
  return y[:t], (table_ND, idx_TK, w_TK)


def _gather_bwd(cfg, res, dy_TD):
  table_ND, idx_TK, w_TK = res
  (t, k), (tp, kp) = idx_TK.shape, _sizes(idx_TK)
  (dw,) = _token_call(
      functools.partial(_gather_dot_kernel, K=kp), tp=tp, kp=kp,
      ins=(_idx_blocks(idx_TK, tp, kp), _pad(dy_TD, tp)), in_specs=(dy_TD.shape[1],),
      outs=[jax.ShapeDtypeStruct((tp, kp), f32)], tables=(table_ND,),
      interpret=cfg.interpret, name="expert_gather_dot_tpu")
  n = table_ND.shape[0]
  dtable = segment_sum(sort_entries(idx_TK, n), w_TK, dy_TD, n, table_ND.dtype,
                       interpret=cfg.interpret)
  return dtable, _int_cotangent(idx_TK), dw[:t, :k].astype(w_TK.dtype)


_gather.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mlp(cfg, x_TE, down_NE, up_NF, idx_TK, w_TK):
  return _mlp_fwd(cfg, x_TE, down_NE, up_NF, idx_TK, w_TK)[0]


def _mlp_fwd(cfg, x_TE, down_NE, up_NF, idx_TK, w_TK):
  (t, _), (tp, kp) = idx_TK.shape, _sizes(idx_TK)
  y, z = _token_call(
      functools.partial(_mlp_fwd_kernel, K=kp, act=cfg.act), tp=tp, kp=kp,
      ins=(_idx_blocks(idx_TK, tp, kp), _pad(w_TK, tp, kp), _pad(x_TE, tp)),
      in_specs=(kp, x_TE.shape[1]),
      outs=[jax.ShapeDtypeStruct((tp, up_NF.shape[1]), x_TE.dtype),
            jax.ShapeDtypeStruct((tp, kp), f32)],
      tables=(down_NE, up_NF), interpret=cfg.interpret, name="expert_mlp_fwd_tpu")
  return y[:t], (x_TE, down_NE, up_NF, idx_TK, w_TK, z)


def _mlp_bwd(cfg, res, dy_TF):
  x_TE, down_NE, up_NF, idx_TK, w_TK, z = res
  (t, k), (tp, kp) = idx_TK.shape, _sizes(idx_TK)
  slot = jax.ShapeDtypeStruct((tp, kp), f32)
  dx, dw, cu, cd = _token_call(
      functools.partial(_mlp_bwd_kernel, K=kp, act=cfg.act), tp=tp, kp=kp,
      ins=(_idx_blocks(idx_TK, tp, kp), _pad(w_TK, tp, kp), z, _pad(dy_TF, tp)),
      in_specs=(kp, kp, dy_TF.shape[1]),
      outs=[jax.ShapeDtypeStruct((tp, x_TE.shape[1]), x_TE.dtype),
            jax.ShapeDtypeStruct((tp, kp), w_TK.dtype), slot, slot],
      tables=(down_NE, up_NF), interpret=cfg.interpret, name="expert_mlp_bwd_tpu")
  n = down_NE.shape[0]
  entries = sort_entries(idx_TK, n)
  dup = segment_sum(entries, cu[:t, :k], dy_TF, n, up_NF.dtype, interpret=cfg.interpret)
  ddown = segment_sum(entries, cd[:t, :k], x_TE, n, down_NE.dtype, interpret=cfg.interpret)
  return dx[:t], ddown, dup, _int_cotangent(idx_TK), dw[:t, :k]


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def expert_gather_pallas_tpu(table_ND, indices_TK, weights_TK, *, interpret=False):
  """y[t] = sum_k weights[t,k] table[indices[t,k]] in weights' dtype (custom VJP)."""
  check_supported("expert_gather", table_ND, weights_TK)
  return _gather(Cfg(interpret=interpret), table_ND, indices_TK, weights_TK)


def expert_mlp_pallas_tpu(x_TE, down_NE, up_NF, indices_TK, weights_TK, *, activation="gelu",
                          interpret=False):
  """y[t] = sum_k w[t,k] act(down[i] . x[t]) up[i] in x's dtype (custom VJP)."""
  check_supported("expert_mlp", x_TE, down_NE, up_NF, weights_TK)
  return _mlp(Cfg(interpret=interpret, act=activation), x_TE, down_NE, up_NF, indices_TK,
              weights_TK)
