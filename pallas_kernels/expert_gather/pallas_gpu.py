"""Expert gathers as Pallas GPU kernels (`pl.pallas_call`, Triton lowering):
docs/architectures/peer.md ("The expert read").

Forward, one program per block of BT tokens, rows gathered straight from the tables in HBM
(integer-array ref indexing) and accumulated in float32 registers; no [T, K, D] tensor exists:

  gather_sum    y[t]    = sum_k w[t,k] table[idx[t,k]]                       (PKM read; dx)
  gather_dot    z[t,k]  = x[t] . table[idx[t,k]]                             (dw)
  mlp forward   z[t,k]  = x[t] . down[i],  y[t] = sum_k w[t,k] act(z[t,k]) up[i],  i = idx[t,k]
                (PEER Algorithm 1; UltraMemV2 Eq. 15-16 with act = identity); z is the residual
  mlp backward  r = dy[t] . up[i];  dw = act(z) r;  dz = w r act'(z);  dx[t] = sum_k dz down[i]
                plus the table-gradient coefficients w act(z) and dz

Table gradients (the custom VJP of `xla.py` as a CSR segment sum): XLA sorts the T*K entries by
row once (`argsort`, shared by both PEER tables) and finds each row's first entry (`searchsorted`); then
`segment_sum` runs one program per block of RB rows and a column slice of BD: it walks its rows'
contiguous run of sorted entries EB at a time, gathers coef * x[token] [EB, BD] and adds them to
its rows with a one-hot [RB, EB] matmul (IEEE float32). Every output row is written exactly once,
by one program, in a fixed order: deterministic, no atomics, and untouched rows get zeros.

Choices [ours]:
- All in-kernel math is float32 (bf16/f16 rows are upcast on load); float64 raises
  NotImplementedError so that `implementation=None` falls back to `xla`.
- Non-power-of-two widths are read and written with masked loads/stores (Triton tensors must have
  power-of-two sizes); tables are never padded or copied.
- Exact GELU needs erf, which the Triton lowering lacks: `_erf` is the Numerical Recipes erfc
  Chebyshev fit (relative error < 1.2e-7), and the activation derivatives are written out.
- Indices and coefficients travel as [K, T] (one contiguous row per slot k).
- The mlp forward stores z in float32 (the only per-entry residual besides x, idx, w), and the
  backward re-gathers every row (as the `xla` custom VJP does).
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

MAX_WIDTH = 4096
TILE_ELEMS = 4096  # BT * padded width of one gathered tile (registers): sets BT
ROW_BLOCK = 16     # RB: table rows per segment-sum program (>= 16: a dot operand)
ENTRY_BLOCK = 32   # EB: sorted entries per segment-sum step
COL_BLOCK = 256    # BD: columns per segment-sum program

f32 = jnp.float32


def check_supported(name, *arrays):
  check_kernel_dtypes(name, *arrays)
  for a in arrays:
    if a.ndim == 2 and a.shape[1] > MAX_WIDTH:
      raise NotImplementedError(f"{name}: row width {a.shape[1]} > {MAX_WIDTH} is not supported")


# ----------------------------------------------------------------------------- activations

def _erf(x):
  """erf via the Numerical Recipes erfc fit (fractional error < 1.2e-7 everywhere)."""
  z = jnp.abs(x)
  t = 1.0 / (1.0 + 0.5 * z)
  poly = (-1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
      -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
          -0.82215223 + t * 0.17087277)))))))))
  erfc = t * jnp.exp(-z * z + poly)
  return jnp.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def act_and_grad(name, z):
  """(act(z), act'(z)) for the activations of `_common.ACTIVATIONS`, Triton-lowerable."""
  if name == "gelu":   # exact GELU: z Phi(z)
    cdf = 0.5 * (1.0 + _erf(z * 0.7071067811865476))
    return z * cdf, cdf + z * jnp.exp(-0.5 * z * z) * 0.3989422804014327
  if name == "relu":
    return jnp.maximum(z, 0.0), jnp.where(z > 0, 1.0, 0.0)
  if name == "silu":
    s = 1.0 / (1.0 + jnp.exp(-z))
    return z * s, s * (1.0 + z * (1.0 - s))
  if name == "identity":
    return z, jnp.ones_like(z)
  raise ValueError(name)


# ----------------------------------------------------------------------------- ref helpers

def _load_rows(ref, rows, width, col0=0, block=None):
  """ref[rows, col0:col0+block] as float32 [len(rows), block]; columns >= width read as 0."""
  block = block or pl.next_power_of_2(width)
  col = col0 + jnp.arange(block, dtype=jnp.int32)
  view = ref.at[rows[:, None], col[None, :]]
  if isinstance(col0, int) and col0 == 0 and block == width:
    return view[...].astype(f32)
  return pltriton.load(view, mask=(col < width)[None, :], other=0).astype(f32)


def _store_tile(ref, val, width, col0=0):
  """ref[:, col0:col0+block] = val, skipping columns >= width."""
  n, block = val.shape
  if isinstance(col0, int) and col0 == 0 and block == width and ref.shape == val.shape:
    ref[...] = val.astype(ref.dtype)
    return
  col = col0 + jnp.arange(block, dtype=jnp.int32)
  view = ref.at[jnp.arange(n, dtype=jnp.int32)[:, None], col[None, :]]
  pltriton.store(view, val.astype(ref.dtype), mask=(col < width)[None, :])


def _call(kernel, *, grid, in_specs, out_specs, out_shape, interpret, name, num_warps=8):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      # Triton params select the Triton lowering (jax 0.10 otherwise defaults to Mosaic GPU).
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name=name)


def _block_tokens(*widths) -> int:
  return max(1, min(32, TILE_ELEMS // pl.next_power_of_2(max(widths))))


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _tok_spec(bt, width):   # [Tp, width] token tiles
  return pl.BlockSpec((bt, width), lambda i: (i, 0))


def _slot_spec(k, bt):      # [K, Tp] per-slot rows
  return pl.BlockSpec((k, bt), lambda i: (0, i))


# ----------------------------------------------------------------------------- token kernels

def _gather_sum_kernel(idx_ref, w_ref, tab_ref, y_ref, *, K, D):
  bt = idx_ref.shape[1]

  def body(k, acc):
    return acc + w_ref[k, :].astype(f32)[:, None] * _load_rows(tab_ref, idx_ref[k, :], D)

  _store_tile(y_ref, lax.fori_loop(0, K, body, jnp.zeros((bt, pl.next_power_of_2(D)), f32)), D)


def gather_sum(table_ND, idx_KT, w_KT, out_dtype, *, bt, interpret):
  """y [Tp, D] = sum_k w[k, t] table[idx[k, t]] (Tp a multiple of bt)."""
  (K, Tp), (N, D) = idx_KT.shape, table_ND.shape
  return _call(functools.partial(_gather_sum_kernel, K=K, D=D), grid=(Tp // bt,),
               in_specs=[_slot_spec(K, bt), _slot_spec(K, bt), _whole((N, D))],
               out_specs=_tok_spec(bt, D), out_shape=jax.ShapeDtypeStruct((Tp, D), out_dtype),
               interpret=interpret, name="expert_gather_sum")(idx_KT, w_KT, table_ND)


def _gather_dot_kernel(idx_ref, x_ref, tab_ref, z_ref, *, K, D):
  x = _load_rows(x_ref, jnp.arange(idx_ref.shape[1], dtype=jnp.int32), D)

  def body(k, carry):
    z_ref[k, :] = jnp.sum(x * _load_rows(tab_ref, idx_ref[k, :], D), axis=1)
    return carry

  lax.fori_loop(0, K, body, 0)


def gather_dot(x_TD, table_ND, idx_KT, *, bt, interpret):
  """z [K, Tp] float32 = x[t] . table[idx[k, t]]."""
  (K, Tp), (N, D) = idx_KT.shape, table_ND.shape
  return _call(functools.partial(_gather_dot_kernel, K=K, D=D), grid=(Tp // bt,),
               in_specs=[_slot_spec(K, bt), _tok_spec(bt, D), _whole((N, D))],
               out_specs=_slot_spec(K, bt), out_shape=jax.ShapeDtypeStruct((K, Tp), f32),
               interpret=interpret, name="expert_gather_dot")(idx_KT, x_TD, table_ND)


def _mlp_fwd_kernel(idx_ref, w_ref, x_ref, down_ref, up_ref, y_ref, z_ref, *, K, E, F, act):
  bt = idx_ref.shape[1]
  x = _load_rows(x_ref, jnp.arange(bt, dtype=jnp.int32), E)

  def body(k, acc):
    i = idx_ref[k, :]
    z = jnp.sum(x * _load_rows(down_ref, i, E), axis=1)
    z_ref[k, :] = z
    c = w_ref[k, :].astype(f32) * act_and_grad(act, z)[0]
    return acc + c[:, None] * _load_rows(up_ref, i, F)

  _store_tile(y_ref, lax.fori_loop(0, K, body, jnp.zeros((bt, pl.next_power_of_2(F)), f32)), F)


def mlp_forward(x_TE, down_NE, up_NF, idx_KT, w_KT, *, act, bt, interpret):
  """(y [Tp, F] in x's dtype, z [K, Tp] float32)."""
  (K, Tp), (N, E), F = idx_KT.shape, down_NE.shape, up_NF.shape[1]
  return _call(
      functools.partial(_mlp_fwd_kernel, K=K, E=E, F=F, act=act), grid=(Tp // bt,),
      in_specs=[_slot_spec(K, bt), _slot_spec(K, bt), _tok_spec(bt, E), _whole((N, E)),
                _whole((N, F))],
      out_specs=[_tok_spec(bt, F), _slot_spec(K, bt)],
      out_shape=[jax.ShapeDtypeStruct((Tp, F), x_TE.dtype), jax.ShapeDtypeStruct((K, Tp), f32)],
      interpret=interpret, name="expert_mlp_fwd")(idx_KT, w_KT, x_TE, down_NE, up_NF)


def _mlp_bwd_kernel(idx_ref, w_ref, z_ref, dy_ref, down_ref, up_ref, dx_ref, dw_ref, cu_ref,
                    cd_ref, *, K, E, F, act):
  bt = idx_ref.shape[1]
  dy = _load_rows(dy_ref, jnp.arange(bt, dtype=jnp.int32), F)

  def body(k, dx):
    i = idx_ref[k, :]
    r = jnp.sum(dy * _load_rows(up_ref, i, F), axis=1)   # dL/d(coef)
    a, da = act_and_grad(act, z_ref[k, :])
    w = w_ref[k, :].astype(f32)
    dz = w * r * da
    dw_ref[k, :] = (a * r).astype(dw_ref.dtype)
    cu_ref[k, :] = w * a          # row i of d(up) gets (w a) dy[t]
    cd_ref[k, :] = dz             # row i of d(down) gets dz x[t]
    return dx + dz[:, None] * _load_rows(down_ref, i, E)

  _store_tile(dx_ref, lax.fori_loop(0, K, body, jnp.zeros((bt, pl.next_power_of_2(E)), f32)), E)


def mlp_backward_tokens(dy_TF, down_NE, up_NF, idx_KT, w_KT, z_KT, dx_dtype, *, act, bt,
                        interpret):
  """(dx [Tp, E], dw [K, Tp] in w's dtype, w act(z) [K, Tp] f32, dz [K, Tp] f32)."""
  (K, Tp), (N, E), F = idx_KT.shape, down_NE.shape, up_NF.shape[1]
  slot = jax.ShapeDtypeStruct((K, Tp), f32)
  return _call(
      functools.partial(_mlp_bwd_kernel, K=K, E=E, F=F, act=act), grid=(Tp // bt,),
      in_specs=[_slot_spec(K, bt), _slot_spec(K, bt), _slot_spec(K, bt), _tok_spec(bt, F),
                _whole((N, E)), _whole((N, F))],
      out_specs=[_tok_spec(bt, E)] + [_slot_spec(K, bt)] * 3,
      out_shape=[jax.ShapeDtypeStruct((Tp, E), dx_dtype),
                 jax.ShapeDtypeStruct((K, Tp), w_KT.dtype), slot, slot],
      interpret=interpret, name="expert_mlp_bwd")(idx_KT, w_KT, z_KT, dy_TF, down_NE, up_NF)


# ----------------------------------------------------------------------------- table gradient

class SortedEntries(NamedTuple):
  """The T*K (row, token) entries sorted by row, and each row block's first entry (CSR)."""
  rows: jax.Array    # [E + EB] int32 sorted rows, padded with -1
  tokens: jax.Array  # [E + EB] int32
  order: jax.Array   # [E] positions in the flattened [T, K] entries
  start: jax.Array   # [num_row_blocks * RB + 1] int32: first entry of row r (E past the end)


def sort_entries(idx_TK, num_rows) -> SortedEntries:
  flat = idx_TK.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  rows = flat[order]
  n_pad = pl.cdiv(num_rows, ROW_BLOCK) * ROW_BLOCK
  start = jnp.searchsorted(rows, jnp.arange(n_pad + 1, dtype=jnp.int32), side="left")
  pad = lambda a, v: jnp.concatenate([a, jnp.full((ENTRY_BLOCK,), v, jnp.int32)])
  tokens = (order // idx_TK.shape[1]).astype(jnp.int32)
  return SortedEntries(pad(rows, -1), pad(tokens, 0), order, start.astype(jnp.int32))


def _segment_sum_kernel(start_ref, rows_ref, tok_ref, coef_ref, x_ref, g_ref, *, D, BD):
  rb = pl.program_id(0) * ROW_BLOCK
  col0 = pl.program_id(1) * BD
  lo, hi = start_ref[rb], start_ref[rb + ROW_BLOCK]
  row_ids = rb + jnp.arange(ROW_BLOCK, dtype=jnp.int32)

  def body(c, acc):
    e0 = lo + c * ENTRY_BLOCK
    live = (e0 + jnp.arange(ENTRY_BLOCK, dtype=jnp.int32)) < hi
    rows = pltriton.load(rows_ref.at[pl.ds(e0, ENTRY_BLOCK)], mask=live, other=-1)
    toks = pltriton.load(tok_ref.at[pl.ds(e0, ENTRY_BLOCK)], mask=live, other=0)
    coef = pltriton.load(coef_ref.at[pl.ds(e0, ENTRY_BLOCK)], mask=live, other=0.0)
    contrib = coef[:, None] * _load_rows(x_ref, toks, D, col0, BD)           # [EB, BD]
    onehot = jnp.where(rows[None, :] == row_ids[:, None], 1.0, 0.0).astype(f32)  # [RB, EB]
    return acc + jnp.dot(onehot, contrib, precision=lax.Precision.HIGHEST,
                         preferred_element_type=f32)

  n_steps = pl.cdiv(hi - lo, ENTRY_BLOCK)
  acc = lax.fori_loop(0, n_steps, body, jnp.zeros((ROW_BLOCK, BD), f32))
  _store_tile(g_ref, acc, D, col0)


def segment_sum(entries: SortedEntries, coef_TK, x_TD, num_rows, out_dtype, *, interpret):
  """G [N, D]: G[n] = sum over entries with row n of coef * x[token], one program per RB rows."""
  D = x_TD.shape[1]
  coef = jnp.concatenate([coef_TK.reshape(-1)[entries.order].astype(f32),
                          jnp.zeros((ENTRY_BLOCK,), f32)])
  n_blocks = pl.cdiv(num_rows, ROW_BLOCK)
  bd = min(COL_BLOCK, max(16, pl.next_power_of_2(D)))
  e = entries.rows.shape[0]
  return _call(
      functools.partial(_segment_sum_kernel, D=D, BD=bd),
      grid=(n_blocks, pl.cdiv(D, bd)),
      in_specs=[_whole(entries.start.shape), _whole((e,)), _whole((e,)), _whole((e,)),
                _whole(x_TD.shape)],
      out_specs=pl.BlockSpec((ROW_BLOCK, D), lambda r, c: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((n_blocks * ROW_BLOCK, D), out_dtype),
      interpret=interpret, name="expert_segment_sum",
  )(entries.start, entries.rows, entries.tokens, coef, x_TD)[:num_rows]


# ----------------------------------------------------------------------------- custom VJPs

class Cfg(NamedTuple):
  bt: int
  interpret: bool
  act: str = "identity"


def _pad_tokens(a, tp):
  return a if a.shape[0] == tp else jnp.pad(a, [(0, tp - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _slots(a_TK, tp):   # [T, K] -> [K, Tp], zero padded (padded tokens have weight 0)
  return _pad_tokens(a_TK, tp).T


def _int_cotangent(a):
  return np.zeros(a.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather(cfg, table_ND, idx_TK, w_TK):
  return _gather_fwd(cfg, table_ND, idx_TK, w_TK)[0]


def _gather_fwd(cfg, table_ND, idx_TK, w_TK):
  t = idx_TK.shape[0]
  tp = pl.cdiv(t, cfg.bt) * cfg.bt
  y = gather_sum(table_ND, _slots(idx_TK.astype(jnp.int32), tp), _slots(w_TK, tp), w_TK.dtype,
                 bt=cfg.bt, interpret=cfg.interpret)[:t]
  return y, (table_ND, idx_TK, w_TK)


def _gather_bwd(cfg, res, dy_TD):
  table_ND, idx_TK, w_TK = res
  t, n = idx_TK.shape[0], table_ND.shape[0]
  tp = pl.cdiv(t, cfg.bt) * cfg.bt
  dw = gather_dot(_pad_tokens(dy_TD, tp), table_ND, _slots(idx_TK.astype(jnp.int32), tp),
                  bt=cfg.bt, interpret=cfg.interpret)[:, :t].T
  dtable = segment_sum(sort_entries(idx_TK, n), w_TK, dy_TD, n, table_ND.dtype,
                       interpret=cfg.interpret)
  return dtable, _int_cotangent(idx_TK), dw.astype(w_TK.dtype)


_gather.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mlp(cfg, x_TE, down_NE, up_NF, idx_TK, w_TK):
  return _mlp_fwd(cfg, x_TE, down_NE, up_NF, idx_TK, w_TK)[0]


def _mlp_fwd(cfg, x_TE, down_NE, up_NF, idx_TK, w_TK):
  t = idx_TK.shape[0]
  tp = pl.cdiv(t, cfg.bt) * cfg.bt
  y, z_KT = mlp_forward(_pad_tokens(x_TE, tp), down_NE, up_NF,
                        _slots(idx_TK.astype(jnp.int32), tp), _slots(w_TK, tp), act=cfg.act,
                        bt=cfg.bt, interpret=cfg.interpret)
  return y[:t], (x_TE, down_NE, up_NF, idx_TK, w_TK, z_KT)


def _mlp_bwd(cfg, res, dy_TF):
  x_TE, down_NE, up_NF, idx_TK, w_TK, z_KT = res
  t, n = idx_TK.shape[0], down_NE.shape[0]
  tp = z_KT.shape[1]
  dx, dw_KT, cu_KT, cd_KT = mlp_backward_tokens(
      _pad_tokens(dy_TF, tp), down_NE, up_NF, _slots(idx_TK.astype(jnp.int32), tp),
      _slots(w_TK, tp), z_KT, x_TE.dtype, act=cfg.act, bt=cfg.bt, interpret=cfg.interpret)
  entries = sort_entries(idx_TK, n)
  dup = segment_sum(entries, cu_KT[:, :t].T, dy_TF, n, up_NF.dtype, interpret=cfg.interpret)
  ddown = segment_sum(entries, cd_KT[:, :t].T, x_TE, n, down_NE.dtype, interpret=cfg.interpret)
  return dx[:t], ddown, dup, _int_cotangent(idx_TK), dw_KT[:, :t].T


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def expert_gather_pallas_gpu(table_ND, indices_TK, weights_TK, *, interpret=False):
  """y[t] = sum_k weights[t,k] table[indices[t,k]] in weights' dtype (custom VJP)."""
  check_supported("expert_gather", table_ND, weights_TK)
  cfg = Cfg(bt=_block_tokens(table_ND.shape[1]), interpret=interpret)
  return _gather(cfg, table_ND, indices_TK, weights_TK)


def expert_mlp_pallas_gpu(x_TE, down_NE, up_NF, indices_TK, weights_TK, *, activation="gelu",
                          interpret=False):
  """y[t] = sum_k w[t,k] act(down[i] . x[t]) up[i] in x's dtype (custom VJP)."""
  check_supported("expert_mlp", x_TE, down_NE, up_NF, weights_TK)
  cfg = Cfg(bt=_block_tokens(down_NE.shape[1], up_NF.shape[1]), interpret=interpret,
            act=activation)
  return _mlp(cfg, x_TE, down_NE, up_NF, indices_TK, weights_TK)


__all__ = ["expert_gather_pallas_gpu", "expert_mlp_pallas_gpu", "act_and_grad"]
