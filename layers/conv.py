"""Short causal depthwise convolution (as in Mamba, Gated DeltaNet and Titans' q/k/v convs).

y_t = sum_{j<K} w_j * x_{t-K+1+j}. The state is the last K-1 inputs, so chunked calls and
one-token decode steps equal the full pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class CausalConv1D(nnx.Module):

  def __init__(self, channels: int, kernel_size: int = 4, *, axis_name: str | None = "mlp",
               rngs: nnx.Rngs):
    if kernel_size < 1:
      raise ValueError(f"CausalConv1D: kernel_size must be >= 1, got {kernel_size}")
    self.kernel_size = kernel_size
    self.channels = channels
    # Init near identity (last tap 1) plus noise, so a fresh conv passes its input through.
    def init(key, shape, dtype):
      w = 0.02 * jax.random.normal(key, shape, dtype)
      return w.at[-1].add(1.0)
    self.weight = nnx.Param(nnx.with_partitioning(init, (None, axis_name))(
        rngs.params(), (kernel_size, channels), jnp.float32))

  def init_state(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
    return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), dtype)

  def __call__(self, x_BTC: jax.Array, *, state=None, segment_ids_BT=None, lengths_B=None,
               reset_tail=None):
    """Returns (y_BTC, tail_BKC): the last K-1 inputs for the next call.

    With `segment_ids_BT` (packed documents), taps that reach before a document's first token read
    `reset_tail` [B, K-1, C] (the tail a document starts from; zeros by default) instead of the
    earlier document. With `lengths_B` only the first lengths_B[b] tokens are real (right padding):
    the tail ends at the last real one.
    """
    b, t, c = x_BTC.shape
    k = self.kernel_size
    tail = self.init_state(b, x_BTC.dtype) if state is None else state.astype(x_BTC.dtype)
    xp = jnp.concatenate([tail, x_BTC], axis=1)  # [B, K-1+T, C]
    w = self.weight[...].astype(x_BTC.dtype)
    if segment_ids_BT is not None:
      # tokens since the document's first token (the carried tail belongs to the row's first
      # document, so its tokens never look past a start)
      idx = jnp.arange(t)
      seg = segment_ids_BT
      starts = jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
      since = idx - jax.lax.cummax(jnp.where(starts, idx, -k), axis=1)   # [B, T]
      reset = (jnp.zeros((b, k - 1, c), x_BTC.dtype) if reset_tail is None
               else reset_tail.astype(x_BTC.dtype))
    y = jnp.zeros_like(x_BTC)
    for j in range(k):
      xs = jax.lax.slice_in_dim(xp, j, j + t, axis=1)  # tap j reads x_{t-(K-1-j)}
      if segment_ids_BT is not None and j < k - 1:
        before = (k - 1 - j) > since                    # the tap reaches before the document
        from_reset = jnp.take_along_axis(reset, jnp.clip(j + since, 0, k - 2)[..., None], axis=1)
        xs = jnp.where(before[..., None], from_reset, xs)
      y = y + xs * w[j]
    if k == 1:
      new_tail = tail
    elif lengths_B is None:
      new_tail = xp[:, xp.shape[1] - (k - 1):]
    else:
      new_tail = jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, k - 1, 0))(
          xp, lengths_B.astype(jnp.int32))
    return y, new_tail
