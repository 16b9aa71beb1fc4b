"""Gated delta rule / linear attention as Pallas TPU (Mosaic) kernels.

Forward: grid (B, H, NT) with the chunk axis last and "arbitrary" (sequential on a TPU core): the
state S [K, V] lives in a float32 VMEM scratch, initialised from h0 at chunk 0; each step loads one
chunk's tiles, runs `_common.chunk_step` (steps 1-8 of the chunked form in
docs/architectures/gated_deltanet.md, with the segment masks: A, T = (I + A)^-1, W, U, V', output,
next state), writes the output tile and the boundary state S_n entering the chunk (the custom-VJP
residual, `_pallas_common`), and the final state at the last chunk.

Backward: the same grid walked in reverse (every chunk index map reads NT - 1 - n, as axlearn's
reversed BlockSpecs do): the state cotangent dS [K, V] lives in a float32 VMEM scratch, initialised
from d(final state); each step loads S_n, recomputes the chunk and writes its gradients
(`_common.chunk_step_bwd`), and d(initial state) is written at the last step.

Choices [ours]:
- float32 in-kernel math (tiles upcast on load). K and V are zero-padded to multiples of 128 (MXU
  lane width); the row-form tiles (G and segment ids as [1, C]) come in a [.., NT, 1, C] layout so
  every block's last two dims equal the array's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta_rule import _common, _pallas_common


def _kernel(q_ref, k_ref, v_ref, b_ref, gc_ref, gr_ref, sc_ref, sr_ref, cin_ref, tail_ref, h0_ref,
            o_ref, hT_ref, st_ref, S_scr, *, scale: float, delta: bool):
  f32 = jnp.float32
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    S_scr[...] = h0_ref[...]

  S_KV = S_scr[...]
  st_ref[...] = S_KV
  o_CV, S_next = _common.chunk_step(
      q_ref[...].astype(f32), k_ref[...].astype(f32), v_ref[...].astype(f32), b_ref[...],
      gc_ref[...], gr_ref[...], sc_ref[...], sr_ref[...], cin_ref[...], tail_ref[...], S_KV,
      scale=scale, delta=delta)
  o_ref[...] = o_CV.astype(o_ref.dtype)
  S_scr[...] = S_next

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    hT_ref[...] = S_next


def _forward(cfg, q, k, v, beta, G, h0, seg, cin, tail):
  """Same contract as pallas_gpu._forward."""
  B, H, Tp, K = q.shape
  V = v.shape[-1]
  C = cfg.chunk
  NT = Tp // C
  f32 = jnp.float32
  col = lambda x: x[..., None]                                   # [.., Tp] -> [.., Tp, 1]
  row = lambda x: x.reshape(x.shape[:-1] + (NT, 1, C))           # [.., Tp] -> [.., NT, 1, C]
  tok = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, n, 0))
  tokb = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, 0, n, 0))
  rowh = pl.BlockSpec((None, None, None, 1, C), lambda b, h, n: (b, h, n, 0, 0))
  rowb = pl.BlockSpec((None, None, None, 1, C), lambda b, h, n: (b, 0, n, 0, 0))
  state = pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))
  kernel = functools.partial(_kernel, scale=cfg.scale, delta=cfg.delta)
  o, S, S_chunks = pl.pallas_call(
      kernel,
      grid=(B, H, NT),
      in_specs=[tok(K), tok(K), tok(V), tok(1), tok(1), rowh, tokb(1), rowb, tokb(1), tokb(1), state],
      out_specs=[tok(V), state,
                 pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, V), q.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), f32),
                 jax.ShapeDtypeStruct((B, H, NT, K, V), f32)],
      scratch_shapes=[pltpu.VMEM((K, V), f32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="gated_delta_rule_fwd" if cfg.delta else "linear_attention_fwd",
  )(q, k, v, col(beta), col(G), row(G), col(seg)[:, None], row(seg)[:, None], col(cin)[:, None],
    col(tail)[:, None], h0)
  return o, S, S_chunks


def _bwd_kernel(q_ref, k_ref, v_ref, b_ref, gc_ref, gr_ref, sc_ref, sr_ref, cin_ref, tail_ref,
                st_ref, do_ref, dSf_ref, dq_ref, dk_ref, dv_ref, db_ref, dG_ref, dh0_ref, dS_scr, *,
                scale: float, delta: bool):
  f32 = jnp.float32
  i = pl.program_id(2)                                # step i handles chunk NT - 1 - i

  @pl.when(i == 0)
  def _():
    dS_scr[...] = dSf_ref[...]

  dq, dk, dv, db, dG, dS_prev = _common.chunk_step_bwd(
      q_ref[...].astype(f32), k_ref[...].astype(f32), v_ref[...].astype(f32), b_ref[...],
      gc_ref[...], gr_ref[...], sc_ref[...], sr_ref[...], cin_ref[...], tail_ref[...], st_ref[...],
      do_ref[...].astype(f32), dS_scr[...], scale=scale, delta=delta)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  db_ref[...] = db
  dG_ref[...] = dG
  dS_scr[...] = dS_prev

  @pl.when(i == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = dS_prev


def _backward(cfg, q, k, v, beta, G, seg, cin, tail, S_chunks, do, dS_final):
  """Same contract as pallas_gpu._backward."""
  B, H, Tp, K = q.shape
  V = v.shape[-1]
  C = cfg.chunk
  NT = Tp // C
  f32 = jnp.float32
  col = lambda x: x[..., None]
  row = lambda x: x.reshape(x.shape[:-1] + (NT, 1, C))
  rev = lambda i: NT - 1 - i
  tok = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, i: (b, h, rev(i), 0))
  tokb = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, i: (b, 0, rev(i), 0))
  rowh = pl.BlockSpec((None, None, None, 1, C), lambda b, h, i: (b, h, rev(i), 0, 0))
  rowb = pl.BlockSpec((None, None, None, 1, C), lambda b, h, i: (b, 0, rev(i), 0, 0))
  state = pl.BlockSpec((None, None, K, V), lambda b, h, i: (b, h, 0, 0))
  chunk_state = pl.BlockSpec((None, None, None, K, V), lambda b, h, i: (b, h, rev(i), 0, 0))
  kernel = functools.partial(_bwd_kernel, scale=cfg.scale, delta=cfg.delta)
  dq, dk, dv, db, dG, dh0 = pl.pallas_call(
      kernel,
      grid=(B, H, NT),
      in_specs=[tok(K), tok(K), tok(V), tok(1), tok(1), rowh, tokb(1), rowb, tokb(1), tokb(1),
                chunk_state, tok(V), state],
      out_specs=[tok(K), tok(K), tok(V), tok(1), tok(1), state],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, K), q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, K), k.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, 1), f32),
                 jax.ShapeDtypeStruct((B, H, Tp, 1), f32),
                 jax.ShapeDtypeStruct((B, H, K, V), f32)],
      scratch_shapes=[pltpu.VMEM((K, V), f32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="gated_delta_rule_bwd" if cfg.delta else "linear_attention_bwd",
  )(q, k, v, col(beta), col(G), row(G), col(seg)[:, None], row(seg)[:, None], col(cin)[:, None],
    col(tail)[:, None], S_chunks, do, dS_final)
  return dq, dk, dv, db[..., 0], dG[..., 0], dh0


def recurrence_pallas_tpu(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size,
                          delta, interpret):
  name = "gated_delta_rule" if delta else "linear_attention"
  _pallas_common.check_supported(name, q, k, v, chunk_size, min_chunk=8)
  pad = lambda n: pl.cdiv(n, 128) * 128
  return _pallas_common.pallas_recurrence(
      q, k, v, beta, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
      chunk_size=chunk_size, delta=delta, interpret=interpret, kernel=_forward,
      kernel_bwd=_backward, K_pad=pad(q.shape[-1]), V_pad=pad(v.shape[-1]))


def gated_delta_rule_pallas_tpu(q, k, v, beta, g, *, scale=None, initial_state=None,
                                segment_ids=None, chunk_size=64, interpret=False):
  return recurrence_pallas_tpu(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                               segment_ids=segment_ids, chunk_size=chunk_size, delta=True,
                               interpret=interpret)
