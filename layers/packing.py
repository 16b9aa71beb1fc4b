"""Packed documents for chunked mixers: move every document to a chunk boundary and back.

A packed row holds several documents (`segment_ids_BT` changes where one ends). Mixers whose math
depends on where chunks, segments or blocks begin (Titans, Miras, MAC segments, landmark blocks,
HCAM chunks) must restart that grid at each document's first token, or a document that starts
mid-chunk would be computed differently from the same document alone. `realign` gives each token a
slot in a longer row of S slots where every document after the first starts at a slot s with
(offset + s) % align == 0; the slots between documents are padding. A mixer runs on the slotted
row (resetting its state at `starts_BS`), and `unalign` gathers the outputs back.

The slot of token t obeys s_t = s_{t-1} + 1, or, at a document start, the next aligned slot. Both
maps are in the family {s -> s + e} U {s -> align * ceil((s + c) / align) + e}, which is closed under
composition, so all slots come from one associative scan (no loop over tokens or documents).

S is static: `align * (ceil(T / align) + extra_chunks)`, by default twice the row rounded up, which
fits any row whose documents (after the first) number at most T / align. A row with more documents
than its slots hold is not truncated silently: the tokens that do not fit get NaN outputs.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Realigned(NamedTuple):
  """Where each token of a packed row goes (B rows of T tokens into S slots)."""
  src_BS: jax.Array      # int32: the token in each slot (the previous token's for padding slots)
  valid_BS: jax.Array    # bool: the slot holds a token
  dst_BT: jax.Array      # int32: the slot of each token (>= S if it did not fit)
  starts_BS: jax.Array   # bool: the slot starts a document that resets the mixer (not the first)
  segment_ids_BS: jax.Array  # int32: the document of each slot (padding: the document before it)
  lengths_B: jax.Array   # int32: slots up to and including the last token of each row


def document_starts(segment_ids_BT: jax.Array) -> jax.Array:
  """bool [B, T]: True where a token's document differs from the previous token's (never at 0)."""
  seg = segment_ids_BT
  return jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def num_slots(t: int, align: int, extra_chunks: int | None = None) -> int:
  n = -(-t // align)
  return align * (n + (n if extra_chunks is None else extra_chunks))


def _slots(starts_BT, align: int, offset_B):
  """s_t for every token: the composition of the per-token maps applied to s_{-1} = -1."""
  b, t = starts_BT.shape
  off = jnp.broadcast_to(jnp.asarray(offset_B, jnp.int32), (b,))[:, None]
  # token map: start -> round(c = 1 + off, e = -off); other -> translate(e = 1)
  is_round = starts_BT
  c = jnp.broadcast_to(1 + off, (b, t))
  e = jnp.where(starts_BT, -off, 1)
  up = lambda x: -((-x) // align) * align  # align * ceil(x / align)

  def compose(f1, f2):  # f2 after f1
    r1, c1, e1 = f1
    r2, c2, e2 = f2
    r = r1 | r2
    c_ = jnp.where(r1, c1, e1 + c2)
    e_ = jnp.where(r2, jnp.where(r1, up(e1 + c2), 0) + e2, e1 + e2)
    return r, c_, e_

  r, c, e = jax.lax.associative_scan(compose, (is_round, c, e), axis=1)
  return jnp.where(r, up(-1 + c) + e, -1 + e)


def realign(segment_ids_BT: jax.Array, align: int, *, offset_B=0,
            extra_chunks: int | None = None) -> Realigned:
  """Slots for a packed row (see the module docstring).

  Args:
    segment_ids_BT: int [B, T], the document of each token.
    align: chunk (or segment, block) length every later document must start on.
    offset_B: int [B] or scalar, the phase of slot 0 in the mixer's grid (a carried state's phase;
      0 for a fresh row). The first document continues from slot 0.
    extra_chunks: padding room in chunks (default: as many as the row has).
  """
  b, t = segment_ids_BT.shape
  s = num_slots(t, align, extra_chunks)
  starts = document_starts(segment_ids_BT)
  dst = _slots(starts, align, offset_B).astype(jnp.int32)
  rows = jnp.arange(b)[:, None]
  tok = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  src = jnp.full((b, s), -1, jnp.int32).at[rows, dst].set(tok, mode="drop")
  valid = src >= 0
  src = jnp.maximum(jax.lax.cummax(src, axis=1), 0)   # padding takes the previous token's source
  starts_bs = jnp.zeros((b, s), bool).at[rows, dst].set(starts, mode="drop")
  seg = jnp.take_along_axis(segment_ids_BT.astype(jnp.int32), src, axis=1)
  lengths = jnp.minimum(dst[:, -1] + 1, s)
  return Realigned(src, valid, dst, starts_bs, seg, lengths)


def to_slots(x_BT, r: Realigned):
  """[B, T, ...] -> [B, S, ...]; zeros in padding slots."""
  idx = r.src_BS.reshape(r.src_BS.shape + (1,) * (x_BT.ndim - 2))
  y = jnp.take_along_axis(x_BT, idx, axis=1)
  return jnp.where(r.valid_BS.reshape(idx.shape), y, jnp.zeros((), y.dtype))


def from_slots(y_BS, r: Realigned):
  """[B, S, ...] -> [B, T, ...]: each token's output; NaN for tokens that did not fit."""
  s = y_BS.shape[1]
  idx = jnp.minimum(r.dst_BT, s - 1).reshape(r.dst_BT.shape + (1,) * (y_BS.ndim - 2))
  y = jnp.take_along_axis(y_BS, idx, axis=1)
  fits = (r.dst_BT < s).reshape(idx.shape)
  return jnp.where(fits, y, jnp.asarray(jnp.nan, y.dtype))
