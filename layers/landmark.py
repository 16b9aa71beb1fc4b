"""Landmark attention (Mohtashami & Jaggi, "Random-Access Infinite Context Length for Transformers",
NeurIPS 2023, arXiv 2305.16300, §3); the equations and our choices: docs/architectures/landmark.md.

Tokens come in blocks of L = `block_size` positions whose last one is a landmark token: position p
(counted over the whole stream, landmarks included) is a landmark iff p mod L = L - 1, and belongs
to block c(p) = p // L. `insert_landmarks` below prepares data in that layout (loss masked at
landmarks). Query i in block c reads, through one softmax (the grouped softmax, Eq. 1-4
of the paper, in its single-softmax form):

  own block     J_c(i) = {j in c, j <= i, j not a landmark}     logits s_ij
  past block b  content keys J_b, gated by its landmark          e_ij = s_{i,lambda(b)} + s_ij
                                                                       - LSE_{j' in J_b} s_ij'
so block b receives total probability exp(s_{i,lambda(b)}) / Z_i and a landmark never passes its own
value on (a_{i,lambda(b)} = 0). Which past blocks a query reads [ours: a rule that is
split-invariant, unlike the paper's chunked inference]:

  - the W = `recent_blocks` most recent complete blocks, always (gated);
  - the top-k (k = `top_k`) of the older complete blocks by landmark score s_{i,lambda(b)}, per
    query and head (`share='token_head'`, the paper's default) or shared by the heads of a query
    (`share='token'`, the paper's max_over_heads); `top_k=None` (or 0) reads every block, which is
    the paper's training form (dense grouped softmax).
  The paper trains with every block visible and retrieves the top-k only at inference; train with
  top_k=None and evaluate the same weights with top_k=k, or train with top_k=k (which is exact
  whenever a sequence has at most W + k complete blocks).

The same code serves training and streaming: one call assembles the cached blocks and the blocks
touched by the new tokens and runs `pallas_kernels.block_retrieval_attention`, so running a sequence
at once, in pieces or token by token gives the same outputs (split invariance, docs/design.md).

Positions: `positions='exact'` [ours] applies RoPE at the true stream positions (landmarks
included) and caches keys rotated. `'stingy'` re-positions retrieved blocks, after the paper's
inference-time scheme (§3.2: retrieved blocks get a small fixed range of positions next to the
current context, so no query-key distance exceeds those seen in training), in our split-invariant
form: the own block and the W recent blocks keep their stream positions, and every older block
(its content and its landmark gate) is scored as if it were the block just before the recent
window, at distance (W + 1) L + off_i - off_j (off = offset within the block) whatever its true
distance. Keys are cached unrotated and rotated per call (`stingy_rotations`). It applies in
training as well as at inference, so the model never sees a far block at any other distance.
`'none'` uses no positional encoding. Not implemented: the `paper_chunked` inference mode and the
`pos_jump_on_mem` augmentation.

State (a growing cache, docs/design.md), n_max = max_len // L blocks (or `cache_blocks`):
  blk_k, blk_v [B, n_max, L-1, H, Dh]  content keys/values of completed blocks (ring, slot
                                       c mod n_max; keys rotated for 'exact', raw for 'stingy')
  lmk_k        [B, n_max, H, Dh]       their landmark keys
  blk_id       [B, n_max]              block index held by a slot (-1 = empty)
  cur_k, cur_v [B, L-1, H, Dh]         content of the incomplete block
  pos          [B]                     tokens consumed (landmarks included)
A cache that overflows forgets the oldest blocks: create it with `init_state(B, max_len=total)` for
exact continuation.

Packed documents [ours]: with `segment_ids_BT` (a change of id between consecutive tokens starts a
document) every document is computed as if it ran alone from the call's initial state: the first
document continues `state` (a fresh state when None), each later one starts at stream position 0
(RoPE and landmark phase restart; build each document with `insert_landmarks`), and no query reads
a key, own block or retrieved block of another document. `doc_grid` moves the keys into the slots
of `layers.packing.realign`, where every later document starts on a block boundary, so the blocks
above never straddle two documents; queries stay on the token axis. A row with more documents than
the slots hold (more than T / L after the first) gets NaN outputs for the tokens that do not fit.
The returned state is the last document's, as if it had run alone.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.packing import Realigned, document_starts, realign, to_slots
from layers.rotary import apply_rope
from pallas_kernels._dispatch import check_implementation
from pallas_kernels.block_retrieval_attention import block_retrieval_attention

IGNORE = -100
POSITIONS = ("exact", "stingy", "none")


@dataclasses.dataclass(frozen=True)
class LandmarkConfig:
  d_model: int
  num_heads: int
  block_size: int = 64  # L, the landmark included (last position of each block)
  top_k: int | None = 4  # older blocks retrieved per query; None or 0 = all (training form)
  recent_blocks: int = 3  # W most recent complete blocks, always visible
  share: str = "token_head"  # 'token_head' (per query and head) | 'token' (shared by the heads)
  positions: str = "exact"  # 'exact' (RoPE at stream positions) | 'stingy' (see below) | 'none'
  rope_base: float = 10000.0
  cache_blocks: int = 256  # cache size in blocks when init_state gets no max_len
  chunk_size: int = 128  # query tile of the xla kernel path
  implementation: str | None = None  # kernel path (None: best available)

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "landmark"))
    if self.top_k == 0:
      object.__setattr__(self, "top_k", None)
    if self.d_model % self.num_heads:
      raise ValueError(f"landmark: d_model={self.d_model} is not divisible by num_heads="
                       f"{self.num_heads}")
    if self.block_size < 2:
      raise ValueError(f"landmark: block_size must be >= 2 (content tokens + the landmark), got "
                       f"{self.block_size}")
    if self.top_k is not None and self.top_k < 0:
      raise ValueError(f"landmark: top_k must be >= 0 (0 or None = all blocks), got {self.top_k}")
    if self.recent_blocks < 0 or self.cache_blocks < 1 or self.chunk_size < 1:
      raise ValueError("landmark: recent_blocks must be >= 0, cache_blocks and chunk_size >= 1")
    if self.share not in ("token_head", "token"):
      raise ValueError(f"landmark: share must be 'token_head' or 'token', got {self.share!r}")
    if self.positions not in POSITIONS:
      raise ValueError(f"landmark: positions must be one of {POSITIONS}, got {self.positions!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def stream_index(content_index, block_size: int):
  """Stream position of content token i (counted from the stream's start) once a landmark follows
  every block_size - 1 content tokens: i + i // (block_size - 1)."""
  return content_index + content_index // (block_size - 1)


def insert_landmarks(inputs_BL, targets_BL, *, block_size: int, landmark_id: int):
  """Inserts `landmark_id` after every block_size - 1 tokens; landmark targets become -100.

  Returns (inputs, targets) of length L + L // (block_size - 1) (numpy in, numpy out; jax arrays
  work too), so position p is a landmark iff p mod block_size = block_size - 1, the layout
  `LandmarkAttention` expects when the row starts at stream position 0. Content targets are kept:
  the last content token of a block still predicts the next content token, skipping the landmark,
  and landmarks are never predicted (as the authors' `lm_benchmark/optim/utils.py`). The landmark id
  must be a vocabulary entry of its own (e.g. the data vocabulary size, with the model's vocab one
  larger).
  """
  xp = jnp if isinstance(inputs_BL, jax.Array) else np
  ell = block_size - 1
  if ell < 1:
    raise ValueError(f"insert_landmarks: block_size must be >= 2, got {block_size}")
  b, length = inputs_BL.shape
  n_lmk = length // ell
  out_len = length + n_lmk
  src = np.arange(length)
  dst = stream_index(src, block_size)  # content token i moves past the i // ell landmarks before it
  lmk_pos = np.arange(n_lmk) * block_size + ell
  inputs = xp.zeros((b, out_len), inputs_BL.dtype)
  targets = xp.full((b, out_len), IGNORE, targets_BL.dtype)
  if xp is np:
    inputs[:, dst] = inputs_BL
    inputs[:, lmk_pos] = landmark_id
    targets[:, dst] = targets_BL
  else:
    inputs = inputs.at[:, dst].set(inputs_BL).at[:, lmk_pos].set(landmark_id)
    targets = targets.at[:, dst].set(targets_BL)
  return inputs, targets


class DocGrid(NamedTuple):
  """Where a call's T tokens sit in the block grid of a mixer (its state at stream position pos0).

  The grid row has `n` positions, grid position g = pos0 + slot. Unpacked (`r` None) the slots are
  the tokens. Packed, the tokens move to `layers.packing.realign` slots, so every later document
  starts at a grid position that is a multiple of `align`; `rel` is then a token's position in its
  own document's stream (pos0 + slot for the first document, which continues the state).
  """
  r: Realigned | None
  n: int                # grid positions of the call (slots)
  pos0_B: jax.Array     # grid position of slot 0
  gpos_BT: jax.Array    # grid position of each token
  rel_BT: jax.Array     # stream position of each token within its document
  doc_BT: jax.Array | None   # document index of each token (0: the first); None unpacked
  doc_BS: jax.Array | None   # document index of each slot (padding: the one before it)
  fits_BT: jax.Array | None  # the token has a slot
  end_B: jax.Array      # grid position after the last token
  origin_B: jax.Array   # grid position where the last document's stream starts (0: the first's)
  last_is_first_B: jax.Array | None  # the row holds a single document (it continues the state)

  def slot_doc(self, gpos_BX):
    """Document index of grid positions (before pos0: the first document's cached part)."""
    idx = jnp.clip(gpos_BX - self.pos0_B[:, None], 0, self.n - 1)
    return jnp.take_along_axis(self.doc_BS, idx, axis=1)


def doc_grid(segment_ids_BT, pos0_B, t: int, align: int) -> DocGrid:
  """The grid of a call (see `DocGrid`); segment_ids_BT None is a single document, no slots."""
  if segment_ids_BT is None:
    g = pos0_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    return DocGrid(None, t, pos0_B, g, g, None, None, None, pos0_B + t, jnp.zeros_like(pos0_B),
                   None)
  r = realign(segment_ids_BT, align, offset_B=pos0_B % align)
  n = r.src_BS.shape[1]
  gpos_BS = pos0_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
  origin_BS = jax.lax.cummax(jnp.where(r.starts_BS, gpos_BS, 0), axis=1)
  doc_BS = jnp.cumsum(r.starts_BS, axis=1, dtype=jnp.int32)
  slot = jnp.minimum(r.dst_BT, n - 1)
  gpos_BT = pos0_B[:, None] + r.dst_BT
  rel_BT = gpos_BT - jnp.take_along_axis(origin_BS, slot, axis=1)
  doc_BT = jnp.cumsum(document_starts(segment_ids_BT), axis=1, dtype=jnp.int32)
  origin_B = jnp.take_along_axis(origin_BS, r.lengths_B[:, None] - 1, axis=1)[:, 0]
  return DocGrid(r, n, pos0_B, gpos_BT, rel_BT, doc_BT, doc_BS, r.dst_BT < n, pos0_B + r.lengths_B,
                 origin_B, doc_BT[:, -1] == 0)


def restart_rows(restart_B, state: dict, empty_keys=()) -> dict:
  """`state` with the rows where restart_B holds emptied: -1 in `empty_keys`, 0 elsewhere."""
  def reset(k, a):
    r = restart_B.reshape((-1,) + (1,) * (a.ndim - 1))
    return jnp.where(r, jnp.asarray(-1 if k in empty_keys else 0, a.dtype), a)
  return {k: reset(k, a) for k, a in state.items()}


def last_document_blocks(grid: DocGrid, win_id_BW, block: int, ring: int):
  """Block ids of a call's window in the last document's own numbering (its first block is 0), the
  blocks of earlier documents made unwritable, and the last document's count of complete blocks:
  the arguments `write_blocks` needs to leave only the last document in the cache."""
  shift = grid.origin_B // block
  done = grid.end_B // block - shift
  rel = jnp.where(win_id_BW >= shift[:, None], win_id_BW - shift[:, None], -ring - 1)
  return rel, done


def scatter_rows(buf_BS, idx_BT, val_BT):
  """buf[b, idx[b, t]] = val[b, t]; out-of-range indices are dropped."""
  return jax.vmap(lambda buf, i, v: buf.at[i].set(v, mode="drop"))(buf_BS, idx_BT, val_BT)


def stream_blocks(cur_BCX, new_BTX, pos0_B, block: int, num_blocks: int):
  """The `num_blocks` blocks of `block` positions starting at block pos0 // block, filled with the
  incomplete block's cached entries (offsets < pos0 mod block) and the new tokens; zeros elsewhere.

  cur_BCX holds the first `cur_BCX.shape[1]` offsets of the incomplete block. Returns
  [B, num_blocks, block, ...].
  """
  b, t = new_BTX.shape[:2]
  tail = new_BTX.shape[2:]
  off0 = pos0_B % block
  buf = jnp.zeros((b, num_blocks * block, *tail), new_BTX.dtype)
  n_cur = cur_BCX.shape[1]
  cur_idx = jnp.arange(n_cur)[None, :]
  cur_idx = jnp.where(cur_idx < off0[:, None], cur_idx, num_blocks * block)
  buf = scatter_rows(buf, cur_idx, cur_BCX.astype(new_BTX.dtype))
  buf = scatter_rows(buf, off0[:, None] + jnp.arange(t)[None, :], new_BTX)
  return buf.reshape(b, num_blocks, block, *tail)


def write_blocks(cache_BN, blocks_BW, block_ids_BW, num_done_B):
  """Writes the completed blocks (id < num_done) into ring slots id mod n; only the last n of them,
  so that no two writes share a slot."""
  n = cache_BN.shape[1]
  ok = (block_ids_BW < num_done_B[:, None]) & (block_ids_BW >= num_done_B[:, None] - n)
  slot = jnp.where(ok, block_ids_BW % n, n)
  return scatter_rows(cache_BN, slot, blocks_BW.astype(cache_BN.dtype))


class FarFrame(NamedTuple):
  """Queries and keys that score the older (retrieved) blocks at their stingy positions."""
  q: jax.Array      # [B, T, H, Dh]     R((W + 1) L + off_i) q_i
  blk_k: jax.Array  # [B, N, L-1, H, Dh] R(off_j) k_j
  lmk_k: jax.Array  # [B, N, H, Dh]     R(L - 1) k_landmark


def stingy_rotations(q_BTHD, gpos_BT, blk_k_BNCHD, lmk_k_BNHD, blk_id_BN, win_k_BWLHD, win_pos_BS,
                     block: int, recent: int, base: float):
  """RoPE for `positions='stingy'` from unrotated q and keys.

  Exact frame (own block, the W recent blocks): grid positions (within a document they differ by the
  stream distance, which is all RoPE sees). Far frame (every older block): block b's key at offset
  off_j sits just before the W recent blocks of query i, i.e. at distance (W + 1) L + off_i - off_j,
  whatever b is. Returns (q exact, FarFrame, block keys exact, landmark keys exact, window keys
  exact).
  """
  rope = lambda x, p: apply_rope(x, p, base=base)
  b, n, c, h, d = blk_k_BNCHD.shape
  off_C = jnp.arange(c, dtype=jnp.int32)
  q_far = rope(q_BTHD, (recent + 1) * block + gpos_BT % block)
  blk_far = rope(blk_k_BNCHD.reshape(b, n * c, h, d), jnp.tile(off_C, n)[None])
  lmk_far = rope(lmk_k_BNHD, jnp.full((1, n), c, jnp.int32))
  blk_pos_BNC = blk_id_BN[:, :, None] * block + off_C
  blk_k = rope(blk_k_BNCHD.reshape(b, n * c, h, d), blk_pos_BNC.reshape(b, n * c))
  lmk_k = rope(lmk_k_BNHD, blk_id_BN * block + c)
  win_k = rope(win_k_BWLHD.reshape(b, -1, h, d), win_pos_BS).reshape(win_k_BWLHD.shape)
  far = FarFrame(q_far, blk_far.reshape(b, n, c, h, d), lmk_far)
  return rope(q_BTHD, gpos_BT), far, blk_k.reshape(b, n, c, h, d), lmk_k, win_k


class LandmarkAttention(nnx.Module):
  """Multi-head landmark attention (see the module docstring); registered as `landmark`."""

  def __init__(self, cfg: LandmarkConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h, d = cfg.num_heads, cfg.head_dim
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    mk = lambda: nnx.Param(nnx.with_partitioning(init, ("embed", "heads", "kv"))(
        rngs.params(), (cfg.d_model, h, d)))
    self.wq, self.wk, self.wv = mk(), mk(), mk()
    out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.wo = nnx.Param(nnx.with_partitioning(out_init, ("heads", "kv", "embed"))(
        rngs.params(), (h, d, cfg.d_model)))

  def num_cache_blocks(self, max_len: int | None) -> int:
    return self.cfg.cache_blocks if max_len is None else max(1, max_len // self.cfg.block_size)

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    n, c = self.num_cache_blocks(max_len), self.cfg.block_size - 1
    h, d = self.cfg.num_heads, self.cfg.head_dim
    return {
        "blk_k": jnp.zeros((batch_size, n, c, h, d), dtype),
        "blk_v": jnp.zeros((batch_size, n, c, h, d), dtype),
        "lmk_k": jnp.zeros((batch_size, n, h, d), dtype),
        "blk_id": jnp.full((batch_size, n), -1, jnp.int32),
        "cur_k": jnp.zeros((batch_size, c, h, d), dtype),
        "cur_v": jnp.zeros((batch_size, c, h, d), dtype),
        "pos": jnp.zeros((batch_size,), jnp.int32),
    }

  def qkv(self, x_BTD, positions_BT):
    """Projections; RoPE at `positions_BT` for 'exact' ('stingy' rotates per call, see __call__)."""
    dt = x_BTD.dtype
    q = jnp.einsum("btd,dhk->bthk", x_BTD, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_BTD, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_BTD, self.wv[...].astype(dt))
    if self.cfg.positions == "exact":
      q = apply_rope(q, positions_BT, base=self.cfg.rope_base)
      k = apply_rope(k, positions_BT, base=self.cfg.rope_base)
    return q, k, v

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    big_l, c, w = cfg.block_size, cfg.block_size - 1, cfg.recent_blocks
    fresh = state is None
    if fresh:
      state = self.init_state(b, max_len=t, dtype=x_BTD.dtype)
    pos0 = state["pos"]
    grid = doc_grid(segment_ids_BT, pos0, t, big_l)  # unpacked: the tokens themselves
    packed = grid.r is not None
    q, k, v = self.qkv(x_BTD, grid.rel_BT)
    if packed:  # keys and values move to the slots; queries stay on the token axis
      k, v = to_slots(k, grid.r), to_slots(v, grid.r)

    # The blocks this call touches: the cached incomplete one, then those of the new slots.
    nb = (grid.n + big_l - 1) // big_l + 1
    c0 = pos0 // big_l
    win_k = stream_blocks(state["cur_k"], k, pos0, big_l, nb)  # [B, nb, L, H, Dh]
    win_v = stream_blocks(state["cur_v"], v, pos0, big_l, nb)
    win_id = c0[:, None] + jnp.arange(nb, dtype=jnp.int32)[None]
    win_pos = c0[:, None] * big_l + jnp.arange(nb * big_l, dtype=jnp.int32)[None]

    # Candidate past blocks: cached ones plus the call's own (only complete ones are ever read:
    # a block b < c(i) has seen its landmark before query i).
    if fresh:  # an empty cache adds nothing
      blk_k, blk_v, lmk_k, blk_id = win_k[:, :, :c], win_v[:, :, :c], win_k[:, :, c], win_id
    else:
      cat = lambda a, w_: jnp.concatenate([a.astype(w_.dtype), w_], axis=1)
      blk_k, blk_v = cat(state["blk_k"], win_k[:, :, :c]), cat(state["blk_v"], win_v[:, :, :c])
      lmk_k, blk_id = cat(state["lmk_k"], win_k[:, :, c]), cat(state["blk_id"], win_id)
    q_blk = grid.gpos_BT // big_l
    bid, qb = blk_id[:, None, :], q_blk[:, :, None]
    past = (bid >= 0) & (bid < qb)
    if packed:  # a block holds one document (they start on block boundaries); cached: the first
      blk_doc = grid.slot_doc(win_id * big_l)
      if not fresh:
        blk_doc = jnp.concatenate([jnp.zeros_like(state["blk_id"]), blk_doc], axis=1)
      past = past & (blk_doc[:, None, :] == grid.doc_BT[:, :, None])
    always = past & (bid >= qb - w)
    allowed = past & (bid < qb - w)
    far = None
    if cfg.positions == "stingy":  # keys stay unrotated in the state; rotate them for this call
      q, far, blk_k, lmk_k, loc_k = stingy_rotations(q, grid.gpos_BT, blk_k, lmk_k, blk_id, win_k,
                                                      win_pos, big_l, w, cfg.rope_base)
    else:
      loc_k = win_k
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    score = lambda q_, l_: jnp.einsum("bthd,bnhd->bthn", q_, l_.astype(q_.dtype),
                                      preferred_element_type=acc) * cfg.head_dim ** -0.5
    gate = score(q, lmk_k)
    if far is not None:  # landmark gates of the older blocks at their stingy positions too
      gate = jnp.where(always[:, :, None, :], gate, score(far.q, far.lmk_k))

    # Own block: same block (hence same document), not in the future, not a landmark, written.
    kp, qp = win_pos[:, None, :], grid.gpos_BT[:, :, None]
    own = ((kp // big_l) == (qp // big_l)) & (kp <= qp) & (kp % big_l != c)
    own = own & (kp < (pos0 + grid.n)[:, None, None])
    local = (loc_k.reshape(b, nb * big_l, *k.shape[2:]), win_v.reshape(b, nb * big_l, *v.shape[2:]),
             own)
    o = block_retrieval_attention(q, blk_k, blk_v, gate, allowed, always=always, k=cfg.top_k,
                                  share=cfg.share, local=local, chunk_size=cfg.chunk_size,
                                  implementation=cfg.implementation,
                                  far=None if far is None else (far.q, far.blk_k))
    y = jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(o.dtype))

    cur = jnp.clip(grid.end_B // big_l - c0, 0, nb - 1)  # the incomplete block after this call
    ids, done = win_id, grid.end_B // big_l  # blocks completed after this call
    if packed:  # the state of the last document alone (a fresh one unless it is the first)
      y = jnp.where(grid.fits_BT[..., None], y, jnp.asarray(jnp.nan, y.dtype))
      ids, done = last_document_blocks(grid, win_id, big_l, state["blk_id"].shape[1])
      state = restart_rows(~grid.last_is_first_B, state, ("blk_id",))
    take = lambda a: jnp.take_along_axis(a, cur[:, None, None, None, None], axis=1)[:, 0, :c]
    new_state = {
        "blk_k": write_blocks(state["blk_k"], win_k[:, :, :c], ids, done),
        "blk_v": write_blocks(state["blk_v"], win_v[:, :, :c], ids, done),
        "lmk_k": write_blocks(state["lmk_k"], win_k[:, :, c], ids, done),
        "blk_id": write_blocks(state["blk_id"], ids, ids, done),
        "cur_k": take(win_k).astype(state["cur_k"].dtype),
        "cur_v": take(win_v).astype(state["cur_v"].dtype),
        "pos": grid.end_B - grid.origin_B,
    }
    return y, new_state
