"""Causal multi-head softmax attention with RoPE (Vaswani et al. 2017; Su et al. 2021), full or
sliding-window, with a KV-cache state (docs/architectures/transformer.md).

State (docs/design.md, "Sequence mixers": a growing cache as a preallocated buffer):
  k, v   [B, S, H, Dh]  rotated keys and values, slot = absolute position mod S
  kpos   [B, S]         absolute position of each slot (-1 = empty)
  kseg   [B, S]         segment id of each slot (packed documents never attend across ids)
  pos    [B]            number of tokens consumed so far
S is the window for sliding-window attention (a ring buffer: unbounded streaming) and `max_len` for
full attention. A full-attention cache that overflows keeps the latest S tokens, i.e. degrades to a
window of S: create the state with `init_state(batch, max_len=total_length)` for exact continuation.
When `state=None` the returned cache holds this call's keys (S = T for full attention).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.packing import document_starts
from layers.rotary import apply_rope

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  d_model: int
  num_heads: int
  window: int | None = None  # None = full causal attention
  rope_base: float = 10000.0
  use_rope: bool = True

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"attention: d_model={self.d_model} is not divisible by num_heads="
                       f"{self.num_heads}; pick num_heads dividing d_model")
    if self.window is not None and self.window < 1:
      raise ValueError(f"attention: window must be >= 1 or None, got {self.window}")


def attend(q_BTHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array,
           mask_BTS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh) + mask) v, float32 softmax; rows with no visible key give 0."""
  scale = q_BTHD.shape[-1] ** -0.5
  acc = jnp.promote_types(jnp.float32, q_BTHD.dtype)  # float64 stays float64 in exact tests
  logits = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BSHD, preferred_element_type=acc) * scale
  logits = jnp.where(mask_BTS[:, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask_BTS[:, None], probs, 0.0)
  return jnp.einsum("bhts,bshd->bthd", probs.astype(v_BSHD.dtype), v_BSHD)


def causal_mask(qpos_BT, kpos_BS, qseg_BT=None, kseg_BS=None, window=None):
  """Visible iff key position is valid (>= 0), not in the future, inside the window, same segment."""
  q = qpos_BT[:, :, None]
  k = kpos_BS[:, None, :]
  m = (k >= 0) & (k <= q)
  if window is not None:
    m = m & (q - k < window)
  if qseg_BT is not None:
    m = m & (qseg_BT[:, :, None] == kseg_BS[:, None, :])
  return m


def write_ring(buf_BS, new_BT, positions_BT, keep_BT=None):
  """Writes the last min(T, S) entries of `new` into slots position mod S of a ring buffer
  (only where `keep_BT`, if given)."""
  s, t = buf_BS.shape[1], new_BT.shape[1]
  n = min(s, t)
  new_BT, positions_BT = new_BT[:, t - n:], positions_BT[:, t - n:]
  slots = positions_BT % s
  if keep_BT is not None:
    slots = jnp.where(keep_BT[:, t - n:], slots, s)  # out of range: dropped
  return jax.vmap(lambda b, sl, x: b.at[sl].set(x, mode="drop"))(buf_BS, slots, new_BT)


class Attention(nnx.Module):

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h, d = cfg.num_heads, cfg.d_model // cfg.num_heads
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.wq = nnx.Param(nnx.with_partitioning(init, ("embed", "heads", "kv"))(
        rngs.params(), (cfg.d_model, h, d)))
    self.wk = nnx.Param(nnx.with_partitioning(init, ("embed", "heads", "kv"))(
        rngs.params(), (cfg.d_model, h, d)))
    self.wv = nnx.Param(nnx.with_partitioning(init, ("embed", "heads", "kv"))(
        rngs.params(), (cfg.d_model, h, d)))
    out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.wo = nnx.Param(nnx.with_partitioning(out_init, ("heads", "kv", "embed"))(
        rngs.params(), (h, d, cfg.d_model)))

  def cache_len(self, max_len: int | None) -> int:
    if self.cfg.window is not None:
      return self.cfg.window if max_len is None else min(self.cfg.window, max_len)
    if max_len is None:
      raise ValueError("full attention needs max_len for its KV cache: "
                       "call init_state(batch_size, max_len=...)")
    return max_len

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    s = self.cache_len(max_len)
    h, d = self.cfg.num_heads, self.cfg.d_model // self.cfg.num_heads
    return {
        "k": jnp.zeros((batch_size, s, h, d), dtype),
        "v": jnp.zeros((batch_size, s, h, d), dtype),
        "kpos": jnp.full((batch_size, s), -1, jnp.int32),
        "kseg": jnp.zeros((batch_size, s), jnp.int32),
        "pos": jnp.zeros((batch_size,), jnp.int32),
    }

  def qkv(self, x_BTD, positions_BT):
    dt = x_BTD.dtype
    q = jnp.einsum("btd,dhk->bthk", x_BTD, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_BTD, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_BTD, self.wv[...].astype(dt))
    if self.cfg.use_rope:
      q = apply_rope(q, positions_BT, base=self.cfg.rope_base)
      k = apply_rope(k, positions_BT, base=self.cfg.rope_base)
    return q, k, v

  def project_out(self, o_BTHD):
    return jnp.einsum("bthk,hkd->btd", o_BTHD, self.wo[...].astype(o_BTHD.dtype))

  def prefix_kv(self, prefix_PD, batch_size: int):
    """Keys/values of a prefix visible to every query (Titans' persistent memory): no RoPE."""
    dt = prefix_PD.dtype
    k = jnp.einsum("pd,dhk->phk", prefix_PD, self.wk[...].astype(dt))
    v = jnp.einsum("pd,dhk->phk", prefix_PD, self.wv[...].astype(dt))
    bc = lambda a: jnp.broadcast_to(a[None], (batch_size, *a.shape))
    return bc(k), bc(v)

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None, prefix_PD=None,
               documents: bool = True):
    """`prefix_PD`: optional extra keys/values visible to every query, whatever the window.

    Packed documents (`segment_ids_BT`): no token attends across documents, and positions restart
    at each document (the first continues the state), so every document sees what it would see
    alone, prefix included (the prefix keys carry no rotation, so absolute query positions
    matter). The returned cache holds the last document only, as if it had run alone.
    `documents=False`: the ids only mask (e.g. HCAM's segments inside one document); positions
    and the cache run on.
    """
    b, t, _ = x_BTD.shape
    pos0 = jnp.zeros((b,), jnp.int32) if state is None else state["pos"]
    positions = pos0[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    in_last = None
    if segment_ids_BT is not None and documents:
      idx = jnp.arange(t, dtype=jnp.int32)[None]
      last_start = jax.lax.cummax(jnp.where(document_starts(seg), idx, -1), axis=1)  # -1: first
      positions = jnp.where(last_start >= 0, idx - last_start, positions)
      in_last = idx >= last_start[:, -1:]
    q, k, v = self.qkv(x_BTD, positions)
    fresh_call = state is None
    if state is None:
      keys, vals, kpos, kseg = k, v, positions, seg
      state = self.init_state(b, max_len=t, dtype=x_BTD.dtype)
    else:
      keys = jnp.concatenate([state["k"].astype(k.dtype), k], axis=1)
      vals = jnp.concatenate([state["v"].astype(v.dtype), v], axis=1)
      kpos = jnp.concatenate([state["kpos"], positions], axis=1)
      kseg = jnp.concatenate([state["kseg"], seg], axis=1)
    mask = causal_mask(positions, kpos, seg, kseg, self.cfg.window)
    if prefix_PD is not None:
      pk, pv = self.prefix_kv(prefix_PD.astype(x_BTD.dtype), b)
      keys = jnp.concatenate([pk, keys], axis=1)
      vals = jnp.concatenate([pv, vals], axis=1)
      mask = jnp.concatenate([jnp.ones((b, t, pk.shape[1]), bool), mask], axis=2)
    o = attend(q, keys, vals, mask)
    if in_last is not None and not fresh_call:
      # the returned cache: the last document's only (it started from an empty cache)
      empty = self.init_state(b, max_len=state["k"].shape[1], dtype=state["k"].dtype)
      restart = in_last[:, 0] == 0
      state = jax.tree.map(lambda e, o_: jnp.where(
          restart.reshape((b,) + (1,) * (o_.ndim - 1)), e, o_), empty, state)
    new_state = {
        "k": write_ring(state["k"], k.astype(state["k"].dtype), positions, in_last),
        "v": write_ring(state["v"], v.astype(state["v"].dtype), positions, in_last),
        "kpos": write_ring(state["kpos"], positions, positions, in_last),
        "kseg": write_ring(state["kseg"], seg, positions, in_last),
        "pos": positions[:, -1] + 1,
    }
    return self.project_out(o), new_state


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
  """Sliding-window attention is `Attention` with a window (registered as `swa`)."""
  window: int | None = 64
