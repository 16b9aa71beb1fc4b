"""HCAM, Hierarchical Chunk Attention Memory (Lampinen, Chan, Banino & Hill, "Towards mental time
travel: a hierarchical memory for reinforcement learning agents", NeurIPS 2021, arXiv 2105.14039),
in a language model (docs/architectures/hcam.md) [ours throughout: the paper's agent memory,
moved into an LM].

Tokens are grouped into segments of S = `segment_len` tokens, and segments into chunks of
C = `chunk_size` (S mod C = 0). The mixer's output for token t in segment n = t // S is

  y_t = Attn_local(h)_t + HCAM(h)_t      (the LM block adds the residual x_t)

- Attn_local: causal RoPE attention restricted to the token's own segment (`layers.attention`
  with a window of S and the segment index as segment id).
- HCAM (the paper's §2 read, as in the released `htm_attention.py`): the memory holds the complete
  C-token chunks M_c of the *earlier* segments (stored under stop-gradient: the layer's normalised
  input h), at most the M_max = `max_chunks` most recent; chunk c is visible to segment n iff
  (c+1) C <= n S and
  c >= n S / C - M_max. Then
      s_tc  = (h_t W_q^g) . (mean_j M_{c,j} W_k^g) / sqrt(F)      one gate head of width F
      S_t   = top-k of the visible chunks by s_tc;  w_tc = softmax_{c in S_t} s_tc
      M~_c  = M_c + PE,  PE_j = sinusoid at position C-1-j (timescales 2..1e4)
      HCAM_t = W_o sum_{c in S_t} w_tc MHA(q = h_t W_q, k = M~_c W_k, v = M~_c W_v)
  computed by `pallas_kernels.block_retrieval_attention` with local=None (w_tc times each chunk's
  softmax is its adjusted-logit form). W_o starts at zero (`zero_init_out`), so HCAM begins as plain
  segment attention. Gradients reach W_q^g, W_k^g, W_q, W_k, W_v, W_o; the memory gets none.

Not copied from the released read module: a query with no visible chunk reads 0 (not
a uniform mix of masked chunks); k is clipped to the number of chunks; each chunk's K/V is projected
once (cached), never per query.

Training and streaming share one code path: a call gathers the cached chunks and the chunks of its
own tokens; the visibility rule hides a chunk until its segment has ended, so the parallel pass
equals segment-by-segment or token-by-token decoding.

State (a growing cache, docs/design.md), R = min(M_max + S/C, max_len // C) ring slots:
  attn_k, attn_v, attn_kpos, attn_kseg, attn_pos    the local attention's cache (window S)
  mem_k, mem_v [B, R, C, H, Dh]   projected chunk keys/values (with PE)
  mem_s        [B, R, F]          projected chunk summaries W_k^g mean(M_c)
  mem_id       [B, R]             chunk index in a slot (-1 = empty)
  cur_k, cur_v [B, C, H, Dh], cur_s [B, C, F]   the incomplete chunk, per token
  pos          [B]

Packed documents [ours]: with `segment_ids_BT` (a change of id between consecutive tokens starts a
document) every document is computed as if it ran alone from the call's initial state: the first
document continues `state` (a fresh state when None), each later one restarts its stream at
position 0, so its segments, chunks, chunk position encodings and RoPE start at its first token;
no local attention, chunk memory or gate crosses a document. The memory's chunks move to the slots
of `layers.packing.realign` (every later document starts on a chunk boundary, so a chunk holds one
document; see `layers.landmark.doc_grid`); queries and the local attention stay on the token axis.
A row with more documents than the slots hold (more than T / C after the first) gets NaN outputs
for the tokens that do not fit. The returned state is the last document's, as if it had run alone.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.attention import Attention, AttentionConfig, attend, causal_mask
from layers.landmark import (
  DocGrid,
  doc_grid,
  last_document_blocks,
  restart_rows,
  scatter_rows,
  stream_blocks,
  write_blocks,
)
from layers.packing import to_slots
from pallas_kernels._dispatch import check_implementation
from pallas_kernels.block_retrieval_attention import block_retrieval_attention


@dataclasses.dataclass(frozen=True)
class HCAMConfig:
  d_model: int
  num_heads: int
  chunk_size: int = 64  # C
  segment_len: int = 512  # S, a multiple of C
  top_k: int | None = 4  # chunks read per query; None or 0 = all visible chunks
  max_chunks: int = 512  # M_max, most recent chunks kept in memory
  gate_dim: int = 0  # F, width of the single gate head; 0 = d_model // num_heads
  rope_base: float = 10000.0  # local attention
  use_rope: bool = True
  zero_init_out: bool = True  # HCAM's output projection starts at 0
  query_tile: int = 128  # query tile of the xla kernel path
  implementation: str | None = None  # kernel path (None: best available)

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "hcam"))
    if self.top_k == 0:
      object.__setattr__(self, "top_k", None)
    if self.d_model % self.num_heads:
      raise ValueError(f"hcam: d_model={self.d_model} is not divisible by num_heads="
                       f"{self.num_heads}")
    if self.d_model % 2:
      raise ValueError(f"hcam: the chunk position encoding needs an even d_model, got "
                       f"{self.d_model}")
    if self.chunk_size < 1 or self.segment_len % self.chunk_size or self.segment_len < 1:
      raise ValueError(f"hcam: segment_len={self.segment_len} must be a positive multiple of "
                       f"chunk_size={self.chunk_size}")
    if self.max_chunks < 1 or (self.top_k is not None and self.top_k < 0):
      raise ValueError("hcam: max_chunks must be >= 1 and top_k >= 0 (0 or None = all)")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def gate_width(self) -> int:
    return self.gate_dim or self.head_dim


def chunk_position_encoding(chunk: int, dim: int, dtype=jnp.float32):
  """[C, D] sinusoid of position C-1-j (the chunk's last token is 0), timescales 2..1e4 (as the
  released read module): first half sin, second half cos."""
  half = dim // 2
  ts = 2.0 * (1e4 / 2.0) ** (np.arange(half) / max(half - 1, 1))
  ang = (chunk - 1 - np.arange(chunk))[:, None] / ts[None]
  return jnp.asarray(np.concatenate([np.sin(ang), np.cos(ang)], axis=-1), dtype)


class HCAM(nnx.Module):
  """Segment attention + hierarchical chunk memory (see the module docstring); registered `hcam`."""

  def __init__(self, cfg: HCAMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, dh, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.gate_width
    self.local = Attention(AttentionConfig(d, h, window=cfg.segment_len, rope_base=cfg.rope_base,
                                           use_rope=cfg.use_rope), rngs=rngs)
    ginit = nnx.initializers.lecun_normal()
    self.gq = nnx.Param(nnx.with_partitioning(ginit, ("embed", "kv"))(rngs.params(), (d, f)))
    self.gk = nnx.Param(nnx.with_partitioning(ginit, ("embed", "kv"))(rngs.params(), (d, f)))
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    mk = lambda: nnx.Param(nnx.with_partitioning(init, ("embed", "heads", "kv"))(
        rngs.params(), (d, h, dh)))
    self.wq, self.wk, self.wv = mk(), mk(), mk()
    out_init = (nnx.initializers.zeros_init() if cfg.zero_init_out
                else nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))
    self.wo = nnx.Param(nnx.with_partitioning(out_init, ("heads", "kv", "embed"))(
        rngs.params(), (h, dh, d)))

  def ring_size(self, max_len: int | None) -> int:
    cfg = self.cfg
    r = cfg.max_chunks + cfg.segment_len // cfg.chunk_size
    return r if max_len is None else max(1, min(r, max_len // cfg.chunk_size))

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    cfg = self.cfg
    r, c, h, dh, f = (self.ring_size(max_len), cfg.chunk_size, cfg.num_heads, cfg.head_dim,
                      cfg.gate_width)
    attn = self.local.init_state(batch_size, max_len=max_len, dtype=dtype)
    return {**{"attn_" + k: v for k, v in attn.items()},
            "mem_k": jnp.zeros((batch_size, r, c, h, dh), dtype),
            "mem_v": jnp.zeros((batch_size, r, c, h, dh), dtype),
            "mem_s": jnp.zeros((batch_size, r, f), dtype),
            "mem_id": jnp.full((batch_size, r), -1, jnp.int32),
            "cur_k": jnp.zeros((batch_size, c, h, dh), dtype),
            "cur_v": jnp.zeros((batch_size, c, h, dh), dtype),
            "cur_s": jnp.zeros((batch_size, c, f), dtype),
            "pos": jnp.zeros((batch_size,), jnp.int32)}

  def _memory_kv(self, m_XD, offsets_X, chunk: int):
    """Projected keys/values of memory tokens (stop-gradient contents + chunk PE) and gate keys."""
    dt = m_XD.dtype
    m_XD = jax.lax.stop_gradient(m_XD)
    pe = chunk_position_encoding(chunk, self.cfg.d_model, dt)[offsets_X]
    mt = m_XD + pe
    k = jnp.einsum("...d,dhk->...hk", mt, self.wk[...].astype(dt))
    v = jnp.einsum("...d,dhk->...hk", mt, self.wv[...].astype(dt))
    s = jnp.einsum("...d,df->...f", m_XD, self.gk[...].astype(dt))
    return k, v, s

  def _read(self, h_BTD, blk_k, blk_v, summ_BNF, allowed_BTN):
    dt = h_BTD.dtype
    acc = jnp.float64 if dt == jnp.float64 else jnp.float32
    qg = jnp.einsum("btd,df->btf", h_BTD, self.gq[...].astype(dt))
    gate = jnp.einsum("btf,bnf->btn", qg, summ_BNF.astype(dt), preferred_element_type=acc)
    gate = (gate * self.cfg.gate_width ** -0.5)[:, :, None, :]
    q = jnp.einsum("btd,dhk->bthk", h_BTD, self.wq[...].astype(dt))
    o = block_retrieval_attention(q, blk_k.astype(dt), blk_v.astype(dt), gate, allowed_BTN,
                                  k=self.cfg.top_k, chunk_size=self.cfg.query_tile,
                                  implementation=self.cfg.implementation)
    return jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(dt))

  def read(self, h_BQD, memory_BMCD, valid_BQM=None):
    """The released read module (the paper's §2) on explicit memory chunks: for tests and analysis.

    h_BQD: queries; memory_BMCD: M chunks of C raw embeddings; valid_BQM: which chunks each query
    may read (default all). Returns W_o-projected [B, Q, D].
    """
    b, q_len = h_BQD.shape[:2]
    m, c = memory_BMCD.shape[1:3]
    k, v, s = self._memory_kv(memory_BMCD, jnp.arange(c), c)
    valid = jnp.ones((b, q_len, m), bool) if valid_BQM is None else valid_BQM
    return self._read(h_BQD, k, v, jnp.mean(s, axis=2), valid)

  def _local_packed(self, x_BTD, st, grid: DocGrid):
    """The local attention of a packed row: RoPE at each token's position in its document, keys of
    the same document and segment only (cached keys belong to the first document). Returns the
    output and the local attention's state after the last document alone."""
    rel, doc = grid.rel_BT, grid.doc_BT
    sid = rel // self.cfg.segment_len
    q, k, v = self.local.qkv(x_BTD, rel)
    cat = lambda a, new: jnp.concatenate([a.astype(new.dtype), new], axis=1)
    keys, vals = cat(st["k"], k), cat(st["v"], v)
    kpos, kseg = cat(st["kpos"], rel), cat(st["kseg"], sid)
    kdoc = cat(jnp.zeros_like(st["kpos"]), doc)
    mask = causal_mask(rel, kpos, sid, kseg, self.local.cfg.window)
    mask = mask & (doc[:, :, None] == kdoc[:, None, :])
    y = self.local.project_out(attend(q, keys, vals, mask))

    st = restart_rows(~grid.last_is_first_B, st, ("kpos",))
    s = st["kpos"].shape[1]
    end = grid.end_B - grid.origin_B  # the last document's length (plus pos0 if it is the first)
    keep = (doc == doc[:, -1:]) & (rel >= end[:, None] - s)  # its last s tokens: distinct slots
    slot = jnp.where(keep, rel % s, s)
    write = lambda buf, new: scatter_rows(buf, slot, new.astype(buf.dtype))
    return y, {"k": write(st["k"], k), "v": write(st["v"], v), "kpos": write(st["kpos"], rel),
               "kseg": write(st["kseg"], sid), "pos": end}

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    c, seg = cfg.chunk_size, cfg.segment_len
    fresh = state is None
    if fresh:
      state = self.init_state(b, max_len=t, dtype=x_BTD.dtype)
    pos0 = state["pos"]
    grid = doc_grid(segment_ids_BT, pos0, t, c)  # unpacked: the tokens themselves
    packed = grid.r is not None
    rel = grid.rel_BT

    attn_state = {k[5:]: v for k, v in state.items() if k.startswith("attn_")}
    if packed:
      y_local, attn_state = self._local_packed(x_BTD, attn_state, grid)
    else:
      y_local, attn_state = self.local(x_BTD, state=attn_state, segment_ids_BT=rel // seg,
                                       documents=False)

    mk, mv, ms = self._memory_kv(x_BTD, rel % c, c)
    if packed:  # the memory's tokens move to the slots; queries stay on the token axis
      mk, mv, ms = (to_slots(a, grid.r) for a in (mk, mv, ms))
    nb = (grid.n + c - 1) // c + 1
    win_k = stream_blocks(state["cur_k"], mk, pos0, c, nb)  # [B, nb, C, H, Dh]
    win_v = stream_blocks(state["cur_v"], mv, pos0, c, nb)
    win_s_tok = stream_blocks(state["cur_s"], ms, pos0, c, nb)  # [B, nb, C, F]
    win_s = jnp.mean(win_s_tok, axis=2)  # only complete chunks are ever read
    win_id = (pos0 // c)[:, None] + jnp.arange(nb, dtype=jnp.int32)[None]
    if fresh:
      blk_k, blk_v, summ, blk_id = win_k, win_v, win_s, win_id
    else:
      cat = lambda a, w_: jnp.concatenate([a.astype(w_.dtype), w_], axis=1)
      blk_k, blk_v = cat(state["mem_k"], win_k), cat(state["mem_v"], win_v)
      summ, blk_id = cat(state["mem_s"], win_s), cat(state["mem_id"], win_id)
    # first chunk of the query's segment: its document's first chunk plus whole segments
    origin = grid.gpos_BT - rel  # grid position of the token's document start (0: the first's)
    first = (origin // c + (rel // seg) * (seg // c))[:, :, None]
    bid = blk_id[:, None, :]
    allowed = (bid >= 0) & (bid < first) & (bid >= first - cfg.max_chunks)
    if packed:  # a chunk holds one document; cached chunks belong to the first
      blk_doc = grid.slot_doc(win_id * c)
      if not fresh:
        blk_doc = jnp.concatenate([jnp.zeros_like(state["mem_id"]), blk_doc], axis=1)
      allowed = allowed & (blk_doc[:, None, :] == grid.doc_BT[:, :, None])
    y = y_local + self._read(x_BTD, blk_k, blk_v, summ, allowed).astype(y_local.dtype)

    cur = jnp.clip(grid.end_B // c - pos0 // c, 0, nb - 1)  # the incomplete chunk after this call
    ids, done = win_id, grid.end_B // c
    mem = {k: v for k, v in state.items() if not k.startswith("attn_")}
    if packed:  # the state of the last document alone (a fresh one unless it is the first)
      y = jnp.where(grid.fits_BT[..., None], y, jnp.asarray(jnp.nan, y.dtype))
      ids, done = last_document_blocks(grid, win_id, c, state["mem_id"].shape[1])
      mem = restart_rows(~grid.last_is_first_B, mem, ("mem_id",))
    take = lambda a: jnp.take_along_axis(
        a, cur.reshape((b,) + (1,) * (a.ndim - 1)), axis=1)[:, 0].astype(state["cur_k"].dtype)
    new_state = {**{"attn_" + k: v for k, v in attn_state.items()},
                 "mem_k": write_blocks(mem["mem_k"], win_k, ids, done),
                 "mem_v": write_blocks(mem["mem_v"], win_v, ids, done),
                 "mem_s": write_blocks(mem["mem_s"], win_s, ids, done),
                 "mem_id": write_blocks(mem["mem_id"], ids, ids, done),
                 "cur_k": take(win_k), "cur_v": take(win_v), "cur_s": take(win_s_tok),
                 "pos": grid.end_B - grid.origin_B}
    return y, new_state
