"""Gated delta rule / linear attention as Pallas GPU kernels (`pl.pallas_call`, Triton lowering).

Forward: one fused kernel (the chunk-state kernel of a two-kernel forward, with the WY factors
computed in the same program): grid (B, H); each program walks the chunks of its sequence with a
`fori_loop`, keeps S [K, V] in registers, and per chunk computes A, T = (I + A)^-1, W, U, V', the
output tile and the next state (`_common.chunk_step`, with the segment masks). It writes o
and the chunk-boundary states S_n, which are the only residuals of the custom VJP
(`_pallas_common`).

Backward: one fused kernel, grid (B, H, V / BV). Each program walks the chunks in reverse with a
`fori_loop` carrying the state cotangent dS [K, BV], loads the boundary state
S_n [K, BV] the forward saved, recomputes the chunk and writes its gradients
(`_common.chunk_step_bwd`: dV', dS_n, dq, dk, the WY backward, dbeta, dG). The V-split is exact
because the backward never mixes value columns; dq, dk, dbeta and dG come out as per-block partial
sums that the wrapper adds (dv and dh0 are per block).

Choices [ours]:
- The backward fuses FLA's `bwd_dhu`, `bwd_dqkwg` and WY-backward kernels into one pass: no h or
  dh round trip through HBM, at the price of recomputing T = (I + A)^-1 in every V block.
- BV = min(V, 64) (FLA's `bwd_dhu` uses 32 or 64): two [K, BV] float32 tiles (S_n and dS) stay
  live, half of what a full-V program would hold; untuned, as no GPU timing exists yet.
- All in-kernel math is float32 (bf16/f16 tiles are upcast on load); f32 dots lower to IEEE
  precision in Triton, so this first kernel does not use bf16 tensor cores.
- K and V are zero-padded to powers of two >= 16 (Triton loads need power-of-two sizes and dots
  need every dimension >= 16); K, V <= 256 (FLA's bound for a register-resident state).
- The forward has no V-split yet: B*H programs, under-occupied when B*H < #SMs; the
  backward has B*H*V/BV.
- At head dims >= 128 the kernels run chunks of at most 32 with 8 warps (shared memory and
  spills, read offline: see WIDE_MAX_CHUNK below).
- Not yet measured on a GPU: parity is checked in interpret mode and the Triton lowering on CPU
  (tests/pallas_kernels/test_lowering.py); whether the backward's many live [C, C] and [K, BV]
  float32 tiles compile without spilling is for `scripts/bench.py --suite=kernels` on a device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta_rule import _common, _pallas_common

MAX_DIM = 256
BLOCK_V = 64
# At K = V = 128 and C = 64 the backward needs more shared memory than an H100 block has (320 KiB
# against 227 KiB), so it would not launch. The chunked form is exact for any chunk, so at head dims
# >= 128 the kernels run chunks of at most 32, with 8 warps (fewer spill bytes). The resources of
# each variant, read offline with scripts/triton_resources.py, are in docs/results.md.
WIDE = 128
WIDE_MAX_CHUNK = 32


def _num_warps(K: int, V: int) -> int:
  return 8 if max(K, V) >= WIDE else 4


def _kernel(q_ref, k_ref, v_ref, b_ref, gc_ref, gr_ref, sc_ref, sr_ref, cin_ref, tail_ref, h0_ref,
            o_ref, hT_ref, st_ref, *, C: int, NT: int, K: int, scale: float, delta: bool):
  f32 = jnp.float32

  def body(i, S_KV):
    sl = pl.ds(pl.multiple_of(i * C, C), C)
    st_ref[pl.ds(pl.multiple_of(i * K, K), K), :] = S_KV
    o_CV, S_next = _common.chunk_step(
        q_ref[sl, :].astype(f32), k_ref[sl, :].astype(f32), v_ref[sl, :].astype(f32),
        b_ref[sl, :], gc_ref[sl, :], gr_ref[:, sl], sc_ref[sl, :], sr_ref[:, sl], cin_ref[sl, :],
        tail_ref[sl, :], S_KV, scale=scale, delta=delta)
    o_ref[sl, :] = o_CV.astype(o_ref.dtype)
    return S_next

  hT_ref[...] = lax.fori_loop(0, NT, body, h0_ref[...])


def _forward(cfg, q, k, v, beta, G, h0, seg, cin, tail):
  """q, k [B, H, Tp, K]; v [B, H, Tp, V]; beta, G [B, H, Tp]; masks [B, Tp]; h0 [B, H, K, V] f32.
  Returns o [B, H, Tp, V], S_final [B, H, K, V], S_chunks [B, H, NT, K, V] (state entering chunk n)."""
  B, H, Tp, K = q.shape
  V = v.shape[-1]
  C = cfg.chunk
  NT = Tp // C
  f32 = jnp.float32
  col = lambda x: x[..., None]                          # [.., Tp] -> [.., Tp, 1]
  row = lambda x: x[..., None, :]                       # [.., Tp] -> [.., 1, Tp]
  bh = lambda *blk: pl.BlockSpec((None, None) + blk, lambda b, h: (b, h) + (0,) * len(blk))
  b_ = lambda *blk: pl.BlockSpec((None, None) + blk, lambda b, h: (b, 0) + (0,) * len(blk))
  kernel = functools.partial(_kernel, C=C, NT=NT, K=K, scale=cfg.scale, delta=cfg.delta)
  o, S, S_chunks = pl.pallas_call(
      kernel,
      grid=(B, H),
      in_specs=[bh(Tp, K), bh(Tp, K), bh(Tp, V), bh(Tp, 1), bh(Tp, 1), bh(1, Tp),
                b_(Tp, 1), b_(1, Tp), b_(Tp, 1), b_(Tp, 1), bh(K, V)],
      out_specs=[bh(Tp, V), bh(K, V), bh(NT * K, V)],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, V), q.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), f32),
                 jax.ShapeDtypeStruct((B, H, NT * K, V), f32)],
      # Triton params select the Triton lowering (jax 0.10 otherwise defaults to Mosaic GPU).
      compiler_params=pltriton.CompilerParams(num_warps=_num_warps(K, V), num_stages=1),
      interpret=cfg.interpret,
      name="gated_delta_rule_fwd" if cfg.delta else "linear_attention_fwd",
  )(q, k, v, col(beta), col(G), row(G), col(seg)[:, None], row(seg)[:, None], col(cin)[:, None],
    col(tail)[:, None], h0)
  return o, S, S_chunks.reshape(B, H, NT, K, V)


def _bwd_kernel(q_ref, k_ref, v_ref, b_ref, gc_ref, gr_ref, sc_ref, sr_ref, cin_ref, tail_ref,
                st_ref, do_ref, dSf_ref, dq_ref, dk_ref, dv_ref, db_ref, dG_ref, dh0_ref, *, C: int,
                NT: int, K: int, scale: float, delta: bool):
  f32 = jnp.float32

  def body(i, dS_KV):
    n = NT - 1 - i                                   # chunks in reverse
    sl = pl.ds(pl.multiple_of(n * C, C), C)
    S_KV = st_ref[pl.ds(pl.multiple_of(n * K, K), K), :]
    dq, dk, dv, db, dG, dS_prev = _common.chunk_step_bwd(
        q_ref[sl, :].astype(f32), k_ref[sl, :].astype(f32), v_ref[sl, :].astype(f32),
        b_ref[sl, :], gc_ref[sl, :], gr_ref[:, sl], sc_ref[sl, :], sr_ref[:, sl], cin_ref[sl, :],
        tail_ref[sl, :], S_KV, do_ref[sl, :].astype(f32), dS_KV, scale=scale, delta=delta)
    dq_ref[sl, :] = dq.astype(dq_ref.dtype)
    dk_ref[sl, :] = dk.astype(dk_ref.dtype)
    dv_ref[sl, :] = dv.astype(dv_ref.dtype)
    db_ref[sl, :] = db
    dG_ref[sl, :] = dG
    return dS_prev

  dh0_ref[...] = lax.fori_loop(0, NT, body, dSf_ref[...])


def _backward(cfg, q, k, v, beta, G, seg, cin, tail, S_chunks, do, dS_final):
  """Inputs as `_forward` plus S_chunks [B, H, NT, K, V], do [B, H, Tp, V], dS_final [B, H, K, V].
  Returns dq, dk [B, H, Tp, K]; dv [B, H, Tp, V]; dbeta, dG [B, H, Tp] (float32); dh0 [B, H, K, V]."""
  B, H, Tp, K = q.shape
  V = v.shape[-1]
  C = cfg.chunk
  NT = Tp // C
  BV = min(V, BLOCK_V)
  NV = V // BV
  f32 = jnp.float32
  col = lambda x: x[..., None]
  row = lambda x: x[..., None, :]
  bh = lambda *blk: pl.BlockSpec((None, None) + blk, lambda b, h, j: (b, h) + (0,) * len(blk))
  b_ = lambda *blk: pl.BlockSpec((None, None) + blk, lambda b, h, j: (b, 0) + (0,) * len(blk))
  bhv = lambda r: pl.BlockSpec((None, None, r, BV), lambda b, h, j: (b, h, 0, j))
  # Partial sums over V blocks: a leading NV axis, added up below.
  part = lambda d: pl.BlockSpec((None, None, None, Tp, d), lambda b, h, j: (j, b, h, 0, 0))
  part_dt = f32 if NV > 1 else q.dtype
  kernel = functools.partial(_bwd_kernel, C=C, NT=NT, K=K, scale=cfg.scale, delta=cfg.delta)
  dq, dk, dv, db, dG, dh0 = pl.pallas_call(
      kernel,
      grid=(B, H, NV),
      in_specs=[bh(Tp, K), bh(Tp, K), bhv(Tp), bh(Tp, 1), bh(Tp, 1), bh(1, Tp),
                b_(Tp, 1), b_(1, Tp), b_(Tp, 1), b_(Tp, 1), bhv(NT * K), bhv(Tp), bhv(K)],
      out_specs=[part(K), part(K), bhv(Tp), part(1), part(1), bhv(K)],
      out_shape=[jax.ShapeDtypeStruct((NV, B, H, Tp, K), part_dt),
                 jax.ShapeDtypeStruct((NV, B, H, Tp, K), part_dt),
                 jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype),
                 jax.ShapeDtypeStruct((NV, B, H, Tp, 1), f32),
                 jax.ShapeDtypeStruct((NV, B, H, Tp, 1), f32),
                 jax.ShapeDtypeStruct((B, H, K, V), f32)],
      compiler_params=pltriton.CompilerParams(num_warps=_num_warps(K, V), num_stages=1),
      interpret=cfg.interpret,
      name="gated_delta_rule_bwd" if cfg.delta else "linear_attention_bwd",
  )(q, k, v, col(beta), col(G), row(G), col(seg)[:, None], row(seg)[:, None], col(cin)[:, None],
    col(tail)[:, None], S_chunks.reshape(B, H, NT * K, V), do, dS_final)
  dq, dk, db, dG = (x.sum(axis=0) if NV > 1 else x[0] for x in (dq, dk, db, dG))
  return dq, dk, dv, db[..., 0], dG[..., 0], dh0


def recurrence_pallas_gpu(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size,
                          delta, interpret):
  name = "gated_delta_rule" if delta else "linear_attention"
  _pallas_common.check_supported(name, q, k, v, chunk_size)
  K, V = q.shape[-1], v.shape[-1]
  if max(K, V) > MAX_DIM:
    raise NotImplementedError(f"{name}: pallas_gpu keeps S in registers; needs K, V <= {MAX_DIM}, "
                              f"got K={K}, V={V}")
  pad = lambda n: max(16, pl.next_power_of_2(n))
  wide = max(pad(K), pad(V)) >= WIDE
  return _pallas_common.pallas_recurrence(
      q, k, v, beta, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
      chunk_size=min(chunk_size, WIDE_MAX_CHUNK) if wide else chunk_size, delta=delta,
      interpret=interpret, kernel=_forward, kernel_bwd=_backward, K_pad=pad(K), V_pad=pad(V))


def gated_delta_rule_pallas_gpu(q, k, v, beta, g, *, scale=None, initial_state=None,
                                segment_ids=None, chunk_size=64, interpret=False):
  return recurrence_pallas_gpu(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                               segment_ids=segment_ids, chunk_size=chunk_size, delta=True,
                               interpret=interpret)
