"""Mixture-of-Memories (Du et al., "MoM: Linear Sequence Modeling with Mixture-of-Memories",
arXiv 2502.13685, §3.2-3.3; docs/architectures/mom.md), gated-delta backend.

  p_t = softmax(x_t W_router);  I_t = TopK(p_t, k);  w_tm = p_tm / sum_{j in I_t} p_tj
  memory m in I_t:  S^m_t = GDN-update(S^m_{t-1}; k^m_t, v^m_t, beta^m_t, g^m_t)   (others skipped:
                    no update and no decay)
  o_t = sum_{m in I_t} w_tm (q_t^m S^m_t) + q_t S^shared_t,  then the gated RMSNorm and W_o.

Each memory has its own k/v/beta/a projections; q, the convs, A_log and dt_bias are shared; the
shared memory has its own k/v/beta/a and reads with weight 1.

Routing without a Python loop over memories [ours, adapting the paper's §3.3]: for every (batch,
memory) the tokens routed to it are moved, in time order, to the front of a row of length T (a
stable sort on "not selected"); the M*B rows run through ONE gated-delta-rule call whose padding
tokens are inert (k = 0, beta = 0, g = 0), and the outputs are gathered back. Cost is O(M*B*T),
linear in T; it spends M/k times the recurrence FLOPs of the paper's packed layout (§3.3), and in
exchange every (memory, batch) row carries its own state, so streaming/decoding continues each memory exactly
(the packed layout cannot give per-segment initial states yet). Convs run along each memory's
subsequence with per-memory tails, as in FLA's inference path (its training path leaks ~3 tokens
across buckets; we do not).
Packed documents (`segment_ids_BT`; a change of id between consecutive tokens starts a document): a
row is computed as if each document ran alone from the layer's initial state. The ids become run ids
(0, 1, 2, ... along the row, so a reused id still starts a new document) and travel with the tokens
into the (batch, memory) rows; there the gated delta rule resets S, and the convs zero their taps,
wherever the run id changes. A memory that a document skips holds the documents around it side by
side in its row and still resets between them. The carried state (S and conv tails) is kept only by
rows whose first routed token is in the first document, so with a `state` the first document
continues it and later documents start fresh. Padding takes the last document's run id, so a memory
that the last document never selects returns the fresh state, and the returned conv tails keep only
inputs of the last document.
Capacity: unlimited. Every routed token is processed, nothing is dropped; imbalance costs nothing
in correctness, only the balance loss (Switch Transformer form, sown per layer as
`AuxLoss("balance")`, weighted by train.aux_loss_weights.balance) pushes toward uniform use.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from layers.base import AuxLoss, Stat, dense, sow
from layers.conv import CausalConv1D
from layers.deltanet import GatedOutput, log_decay, mamba_decay_params
from layers.norms import l2_normalize
from pallas_kernels import gated_delta_rule
from pallas_kernels._dispatch import check_implementation


@dataclasses.dataclass(frozen=True)
class MoMConfig:
  d_model: int
  num_heads: int
  num_memories: int = 4
  top_k: int = 2
  shared_memory: bool = True
  head_dim: int | None = None
  conv_size: int = 4
  chunk_size: int = 64
  implementation: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "mom"))
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"mom: d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    if not 1 <= self.top_k <= self.num_memories:
      raise ValueError(f"mom: need 1 <= top_k <= num_memories, got top_k={self.top_k}, "
                       f"num_memories={self.num_memories}")

  @property
  def dk(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


def _run_ids(segment_ids_BT):
  """[B, T] int32 document index along each row: +1 at every change of segment id."""
  change = (segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), jnp.cumsum(change, axis=1)], axis=1)


def _last_document_tail(tail_RKC, runs_RT, lengths_R, last_R):
  """Zero the conv-tail entries that do not belong to the last document.

  The tail holds the inputs at row positions lengths-(K-1) .. lengths-1 (negative: the carried tail,
  which belongs to document 0).
  """
  k1, t = tail_RKC.shape[1], runs_RT.shape[1]
  pos = lengths_R[:, None] - k1 + jnp.arange(k1)[None]  # [R, K-1]
  run_at = jnp.take_along_axis(runs_RT, jnp.clip(pos, 0, t - 1), axis=1)
  keep = jnp.where(pos >= 0, run_at == last_R[:, None], (last_R == 0)[:, None])
  return jnp.where(keep[..., None], tail_RKC, jnp.zeros_like(tail_RKC))


def balance_loss(probs_NM, idx_NK, num_memories: int):
  """Switch/Mixtral form: M * sum_{j,m} f[j,m] P[m]  (= k when routing is uniform)."""
  mask = jax.nn.one_hot(idx_NK, num_memories, dtype=jnp.float32)  # [N, k, M]
  f = jnp.mean(mask, axis=0)
  p = jnp.mean(probs_NM, axis=0)
  return num_memories * jnp.sum(f * p[None, :])


class MoM(nnx.Module):

  def __init__(self, cfg: MoMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, dk, m = cfg.d_model, cfg.num_heads, cfg.dk, cfg.num_memories
    self.router = dense(rngs, (d, m), ("embed", None), std=0.02)
    self.wq = dense(rngs, (d, h * dk), ("embed", "mlp"))
    init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2)
    self.wk = nnx.Param(init(rngs.params(), (m, d, h * dk)))
    self.wv = nnx.Param(init(rngs.params(), (m, d, h * dk)))
    self.wb = nnx.Param(0.02 * jax.random.normal(rngs.params(), (m, d, h)))
    self.wa = nnx.Param(0.02 * jax.random.normal(rngs.params(), (m, d, h)))
    self.A_log, self.dt_bias = mamba_decay_params(h, rngs)
    self.conv_q = CausalConv1D(h * dk, cfg.conv_size, rngs=rngs)
    self.conv_k = CausalConv1D(h * dk, cfg.conv_size, rngs=rngs)
    self.conv_v = CausalConv1D(h * dk, cfg.conv_size, rngs=rngs)
    if cfg.shared_memory:
      self.sk = dense(rngs, (d, h * dk), ("embed", "mlp"))
      self.sv = dense(rngs, (d, h * dk), ("embed", "mlp"))
      self.sb = dense(rngs, (d, h), ("embed", None), std=0.02)
      self.sa = dense(rngs, (d, h), ("embed", None), std=0.02)
    self.out = GatedOutput(d, h, dk, rngs=rngs)

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    del max_len
    cfg = self.cfg
    h, dk, m, c = cfg.num_heads, cfg.dk, cfg.num_memories, cfg.conv_size
    tails = lambda *lead: jnp.zeros((*lead, c - 1, h * dk), dtype)
    state = {"S": jnp.zeros((batch_size, m, h, dk, dk), jnp.float32),
             "conv": {n: tails(batch_size, m) for n in ("q", "k", "v")}}
    if cfg.shared_memory:
      state["shared_S"] = jnp.zeros((batch_size, h, dk, dk), jnp.float32)
      state["shared_conv"] = {n: tails(batch_size) for n in ("q", "k", "v")}
    return state

  def _memory_pass(self, xq, xk, xv, b_pre, a_pre, S0, conv, lengths, runs=None, last=None):
    """One gated-delta-rule pass over rows [R, T, ...] (R = B*M or B) with real lengths [R].

    `runs` [R, T]: run ids (document index along the original row; padding carries `last` [R], the
    run id of the original row's final document), or None for one document per row.
    """
    cfg = self.cfg
    r, t, _ = xq.shape
    h, dk = cfg.num_heads, cfg.dk
    if runs is not None:
      # The carried state belongs to document 0: rows that start in a later document start fresh.
      keep = runs[:, 0] == 0
      S0 = jnp.where(keep[:, None, None, None], S0, jnp.zeros_like(S0))
      conv = jax.tree.map(lambda a: jnp.where(keep[:, None, None], a, jnp.zeros_like(a)), conv)
    q, cq = self.conv_q(xq, state=conv["q"], segment_ids_BT=runs, lengths_B=lengths)
    k, ck = self.conv_k(xk, state=conv["k"], segment_ids_BT=runs, lengths_B=lengths)
    v, cv = self.conv_v(xv, state=conv["v"], segment_ids_BT=runs, lengths_B=lengths)
    tails = {"q": cq, "k": ck, "v": cv}
    if runs is not None:
      tails = jax.tree.map(lambda a: _last_document_tail(a, runs, lengths, last), tails)
    real = (jnp.arange(t)[None] < lengths[:, None])[..., None]  # [R, T, 1]
    q = l2_normalize(jax.nn.silu(q).reshape(r, t, h, dk))
    k = l2_normalize(jax.nn.silu(k).reshape(r, t, h, dk)) * real[..., None]
    v = jax.nn.silu(v).reshape(r, t, h, dk)
    beta = jax.nn.sigmoid(b_pre.astype(jnp.float32)) * real
    g = log_decay(a_pre, self.A_log[...], self.dt_bias[...]) * real
    o, S = gated_delta_rule(q, k, v, beta, g, initial_state=S0, segment_ids=runs,
                            chunk_size=cfg.chunk_size, implementation=cfg.implementation)
    return o, S, tails

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    cfg = self.cfg
    b, t, d = x_BTD.shape
    h, dk, m, kk = cfg.num_heads, cfg.dk, cfg.num_memories, cfg.top_k
    dt = x_BTD.dtype
    state = self.init_state(b, dtype=dt) if state is None else state
    # Router (float32), top-k, renormalised weights.
    probs = jax.nn.softmax(x_BTD.astype(jnp.float32) @ self.router[...], axis=-1)  # [B, T, M]
    top_p, top_i = jax.lax.top_k(probs, kk)
    weights = top_p / jnp.sum(top_p, -1, keepdims=True)
    sel = jnp.sum(jax.nn.one_hot(top_i, m, dtype=jnp.float32), axis=2)  # [B, T, M] 0/1
    w_BTM = jnp.sum(jax.nn.one_hot(top_i, m, dtype=jnp.float32) * weights[..., None], axis=2)
    sow(self, AuxLoss, "balance", balance_loss(probs.reshape(-1, m), top_i.reshape(-1, kk), m))
    sow(self, Stat, "router_entropy", -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-9), -1)))
    sow(self, Stat, "memory_load_max", jnp.max(jnp.mean(sel, axis=(0, 1))) / (kk / m))
    # Per (batch, memory): routed tokens first, in time order.
    sel_BMT = rearrange(sel, "b t m -> b m t")
    order = jnp.argsort(1 - sel_BMT, axis=-1, stable=True)  # [B, M, T]
    lengths = jnp.sum(sel_BMT, -1).astype(jnp.int32)  # [B, M]
    x_rows = jnp.take_along_axis(x_BTD[:, None], order[..., None], axis=2)  # [B, M, T, D]
    xq = x_rows @ self.wq[...].astype(dt)
    xk = jnp.einsum("bmtd,mdo->bmto", x_rows, self.wk[...].astype(dt))
    xv = jnp.einsum("bmtd,mdo->bmto", x_rows, self.wv[...].astype(dt))
    b_pre = jnp.einsum("bmtd,mdh->bmth", x_rows, self.wb[...].astype(dt))
    a_pre = jnp.einsum("bmtd,mdh->bmth", x_rows, self.wa[...].astype(dt))
    flat = lambda a: a.reshape(b * m, *a.shape[2:])
    if segment_ids_BT is None:
      runs = runs_rows = last = last_rows = None
    else:
      # Run ids routed with the tokens; padding (after the real tokens) takes the last document's.
      runs = _run_ids(segment_ids_BT)
      last = runs[:, -1]
      runs_rows = jnp.take_along_axis(jnp.broadcast_to(runs[:, None], (b, m, t)), order, axis=-1)
      runs_rows = jnp.where(jnp.arange(t) < lengths[..., None], runs_rows, last[:, None, None])
      runs_rows = runs_rows.reshape(b * m, t)
      last_rows = jnp.repeat(last, m)
    o_rows, S, conv = self._memory_pass(
        flat(xq), flat(xk), flat(xv), flat(b_pre), flat(a_pre), flat(state["S"]),
        jax.tree.map(flat, state["conv"]), lengths.reshape(-1), runs_rows, last_rows)
    o_rows = o_rows.reshape(b, m, t, h, dk)
    inverse = jnp.argsort(order, axis=-1)  # position of token t inside its row
    o_BMT = jnp.take_along_axis(o_rows, inverse[..., None, None], axis=2)
    w_BMT = rearrange(w_BTM, "b t m -> b m t").astype(o_BMT.dtype)
    o = jnp.einsum("bmthv,bmt->bthv", o_BMT, w_BMT)
    new_state = {"S": S.reshape(b, m, h, dk, dk),
                 "conv": jax.tree.map(lambda a: a.reshape(b, m, *a.shape[1:]), conv)}
    if cfg.shared_memory:
      full = jnp.full((b,), t, jnp.int32)
      o_sh, S_sh, conv_sh = self._memory_pass(
          x_BTD @ self.wq[...].astype(dt), x_BTD @ self.sk[...].astype(dt),
          x_BTD @ self.sv[...].astype(dt), x_BTD @ self.sb[...].astype(dt),
          x_BTD @ self.sa[...].astype(dt), state["shared_S"], state["shared_conv"], full,
          runs, last)
      o = o + o_sh.astype(o.dtype)
      new_state["shared_S"] = S_sh
      new_state["shared_conv"] = conv_sh
    return self.out(o, x_BTD), new_state
