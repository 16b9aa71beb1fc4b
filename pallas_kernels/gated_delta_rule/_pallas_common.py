"""What the GPU and TPU Pallas paths of the gated delta rule / linear attention share.

- The layout both kernels read: heads-major [B, H, Tp, D] tokens (Tp = T padded to
  the chunk), per-token columns [B, H, Tp] (beta, chunk-local cumsum G) and masks [B, Tp].
- `pallas_recurrence`: the public-facing wrapper (padding, cumsum, slicing back) around a
  `jax.custom_vjp` whose forward is a backend kernel and whose residuals are the inputs plus the
  chunk-boundary states S_n the kernel writes (docs/design.md, "Kernel ops").
- The backward is a backend Pallas kernel too: a reverse walk over chunks carrying the state
  cotangent dS, recomputing each chunk from its saved boundary state and applying the hand-derived
  `_common.chunk_step_bwd` (docs/architectures/gated_deltanet.md, "Backward"). dg is the reverse
  cumsum of dG, which autodiff of the wrapper's chunk-local cumsum supplies; padding is sliced
  away the same way.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_kernel_dtypes, is_pow2
from pallas_kernels.gated_delta_rule import _common


class Cfg(NamedTuple):
  """Static configuration of one kernel call (hashable: a custom_vjp nondiff argument)."""
  chunk: int
  scale: float
  delta: bool
  interpret: bool
  kernel: Callable       # (cfg, q, k, v, beta, G, h0, seg, cin, tail) -> (o, S_final, S_chunks)
  kernel_bwd: Callable   # (cfg, q, k, v, beta, G, seg, cin, tail, S_chunks, do, dS_final)
                         #   -> (dq, dk, dv, dbeta, dG, dh0)


def check_supported(name: str, q, k, v, chunk_size: int, *, min_chunk: int = 16) -> None:
  """NotImplementedError (so dispatch under implementation=None falls back to xla) for what the
  kernels do not handle."""
  check_kernel_dtypes(name, q, k, v)
  if not is_pow2(chunk_size, min_chunk):
    raise NotImplementedError(f"{name}: Pallas kernels need a power-of-two chunk_size >= "
                              f"{min_chunk}, got {chunk_size}")


def _pad_last(x, n):
  return x if x.shape[-1] == n else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def pallas_recurrence(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size, delta,
                      interpret, kernel, kernel_bwd, K_pad: int, V_pad: int):
  """Shared wrapper: pads T to the chunk and K, V to (K_pad, V_pad) with zeros (exact: zero key
  channels and value columns change nothing), runs the custom-VJP core, slices back."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  NT = -(-T // C)
  Tp = NT * C
  f32 = jnp.float32
  scale = _common.default_scale(scale, K)   # from the true K, not the padded one
  beta = jnp.ones((B, T, H), f32) if beta is None else beta
  g = jnp.zeros((B, T, H), f32) if g is None else g

  def heads_major(x, width=None):        # [B, T, H, ...] -> [B, H, Tp, ...]
    x = jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x, 2, 1)
    return x if width is None else _pad_last(x, width)

  q_, k_ = heads_major(q, K_pad), heads_major(k, K_pad)
  v_ = heads_major(v, V_pad)
  beta_ = heads_major(beta.astype(f32))
  # Chunk-local cumsum in XLA: autodiff then handles dg = reverse cumsum of dG.
  G_ = jnp.cumsum(heads_major(g.astype(f32)).reshape(B, H, NT, C), axis=-1).reshape(B, H, Tp)
  seg, cin, tail = (m.reshape(B, Tp) for m in _common.chunk_masks(segment_ids, B, T, C, f32))
  h0 = jnp.zeros((B, H, K_pad, V_pad), f32) if initial_state is None else (
      _pad_last(jnp.pad(initial_state.astype(f32), [(0, 0), (0, 0), (0, K_pad - K), (0, 0)]),
                V_pad))
  cfg = Cfg(chunk=C, scale=scale, delta=delta, interpret=interpret, kernel=kernel,
            kernel_bwd=kernel_bwd)
  o, S = _core(cfg, q_, k_, v_, beta_, G_, h0, seg, cin, tail)
  o = jnp.moveaxis(o[:, :, :T, :V], 1, 2)
  return o, S[:, :, :K, :V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, beta, G, h0, seg, cin, tail):
  o, S, _ = cfg.kernel(cfg, q, k, v, beta, G, h0, seg, cin, tail)
  return o, S


def _core_fwd(cfg, q, k, v, beta, G, h0, seg, cin, tail):
  o, S, S_chunks = cfg.kernel(cfg, q, k, v, beta, G, h0, seg, cin, tail)
  # Residuals: the inputs and the chunk-boundary states only; nothing inside a chunk is kept.
  return (o, S), (q, k, v, beta, G, seg, cin, tail, S_chunks)


def _core_bwd(cfg, res, cts):
  q, k, v, beta, G, seg, cin, tail, S_chunks = res
  do, dS_final = cts
  dq, dk, dv, dbeta, dG, dh0 = cfg.kernel_bwd(cfg, q, k, v, beta, G, seg, cin, tail, S_chunks, do,
                                              dS_final.astype(jnp.float32))
  zeros = jnp.zeros_like
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbeta, dG, dh0, zeros(seg),
          zeros(cin), zeros(tail))


_core.defvjp(_core_fwd, _core_bwd)
