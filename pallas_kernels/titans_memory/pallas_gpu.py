"""Titans memory: the per-chunk step as a Pallas GPU kernel (`pl.pallas_call`, Triton lowering).

Titans (Behrouz et al., arXiv 2501.00663 v1 §3.2, Eq. 16-18; docs/architectures/titans.md).
The whole chunked engine stays `xla.memory_xla` (scan over chunks, `jax.checkpoint`, phase shift,
padding masks, chunk-end carry); this module only replaces its vmapped `chunk_step` through the
`chunk_fn` hook, so the kernel path inherits split invariance and the chunk-boundary backprop
memory.

One chunk of n tokens of one (batch row, head) per program, grid (B, H), everything fused: the
inner-gradient factors, the dual-form read and the chunk-end carry (`chunk_vjp.chunk_math`, whose
steps 2-3 are `engine.read_and_carry`, the code the XLA path runs), over this module's dots.

The decay matrices (beta, f, mom, A diag(m) B; `xla.decay_matrices`, a cumprod) are computed outside
the kernel in plain JAX, per (b, h, chunk), and theta is folded into them there: the kernel gets
G^(l) = A diag(m) B diag(theta^(l)) [n, n], the carry columns G^(l)[n-1, :] and theta^(l) B[n-1, :]
[n, 1], beta and f [n, 1] and beta_n, f_n, mom_n [1, 1] (Triton cannot slice an element out of a
loaded tile). Their gradients (and so theta's, eta's and log_a's) flow back through plain JAX.

Backward: `jax.custom_vjp` around the per-chunk call; the residuals are the kernel inputs only. A
second `pl.pallas_call` (grid (B, H)) runs `chunk_vjp.chunk_math_bwd`, the VJP of `chunk_math`
written out by hand (one kernel, each weight tile short-lived; the XLA path runs the same VJP for
the Titans rule). Every weight cotangent is stored as soon as it is formed, and each [out, in]
input is read where a dot needs it (twice or three times per program in all; HBM traffic is cheap
next to shared memory here), so at most two or three state tiles are staged at a time. The
LN-affine cotangents leave per (b, h) and are summed over b outside.

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

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import check_kernel_dtypes, is_pow2, tile_dot
from pallas_kernels.titans_memory.chunk_vjp import ChunkIn, chunk_math, chunk_math_bwd, gelu_grad
from pallas_kernels.titans_memory.chunk_vjp import layer_norm as tile_layer_norm
from pallas_kernels.titans_memory.engine import (
  ChunkCarry,
  ChunkOut,
  ChunkTokens,
  DotOps,
  MemoryInputs,
  MemoryParams,
  MemoryState,
)
from pallas_kernels.titans_memory.rules import TITANS
from pallas_kernels.titans_memory.xla import chunk_inputs, memory_xla

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


class _Lazy:
  """A kernel input read where it is used (`_val`), not at the top of the program: Triton stages
  every dot operand in shared memory from its load on, so six [E, D] state tiles loaded up front
  would all be resident at once (more than an H100 block has at D = 64, E = 256)."""

  def __init__(self, ref):
    self.ref = ref


def _val(x):
  return x.ref[...].astype(f32) if isinstance(x, _Lazy) else x


KERNEL_OPS = DotOps(mm=_mm, mm_t=_mm_t, t_mm=_t_mm, gelu=_gelu, layer_norm=tile_layer_norm,
                    val=_val, gelu_grad=functools.partial(gelu_grad, erf=_erf))


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
  _store(refs[n_in:], jax.tree.leaves(chunk_math(KERNEL_OPS, ins)))


def _bwd_kernel(*refs, tree, ct_tree, n_in: int, n_ct: int):
  ins = jax.tree.unflatten(tree, [_Lazy(r) for r in refs[:n_in]])
  cts = jax.tree.unflatten(ct_tree, [_Lazy(r) for r in refs[n_in:n_in + n_ct]])
  outs = jax.tree.unflatten(tree, refs[n_in + n_ct:])

  def put(name, l, val):
    ref = getattr(outs, name) if l is None else getattr(outs, name)[l]
    ref[...] = val.astype(ref.dtype)

  chunk_math_bwd(KERNEL_OPS, ins, cts, put)


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
  (b, h) (`xla.titans_chunk_fn`, with the kernel in place of the vmapped tile math)."""
  del keep                             # Titans: no lag token (and no Huber threshold, no KL scale)
  ins, since_base = chunk_inputs(carry, tok, params)
  y, x_new, s_new = _chunk_call(cfg, jax.tree.map(lambda t: t.astype(f32), ins))
  return ChunkOut(y, x_new, s_new, carry.xb, since_base)


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
