"""Titans: learning to memorize at test time (Behrouz et al., arXiv 2501.00663 v1; NeurIPS 2025).

Equations as implemented, with v1's equation numbers: docs/architectures/titans.md.

- `NeuralMemory` (registered `titans_lmm`): the long-term memory as a token mixer:
    q, k, v = SiLU(CausalConv_4(x W_{q,k,v}));  q, k <- L2-normalised per head
    theta = theta_max * sigmoid(x W_theta + b_theta)   per token, head and memory layer
    eta   = sigmoid(x W_eta + b_eta);  log a = log_sigmoid(-(x W_alpha + b_alpha))
    z = Memory(q, k, v, theta, eta, a)                  Eq. 13-15, chunked (pallas_kernels.titans_memory)
    o = W_o concat_h(RMSNorm_h(z) * SiLU(x W_g))
  The memory is an MLP per head, M_W(x) = x + LN(W_2 GELU(W_1 x)) (depth 2, expansion 4), or the
  linear W x at depth 1. Persistent tokens P (v1 §3.3) are consumed first: the state after P is the
  learned initial state, so `init_state` runs the memory over P [ours: equal to prepending P].
- `MAG` (Eq. 26-28): sliding-window attention over [P; x] beside the LMM;
  o = W_o[RMSNorm(y) * sigmoid(RMSNorm(z))].
- `MAL` (Eq. 29-31): the LMM, then sliding-window attention over its output (prefix P visible).
- `MAC` (Eq. 21-25): per segment of C tokens, retrieve h = M_{W_prev}(q^r) read-only, attend over
  [P; h; x_seg] (causal in h and x [ours]), write the memory with the attention block's output
  RMSNorm(x_seg + y) and read per token z_j = M_{W_j}(q_j) [ours],
  o = W_o[RMSNorm(y) * sigmoid(RMSNorm(z))].
  [ours] Eq. 23-24 write with "y_t = Attn(S~)" and leave the attention block's residual implicit; we
  include it, RMS-normalised like every LMM input. Without it the memory sees token identities
  only after the attention has learned to copy them, and MAC learned MQAR far worse (the runs:
  docs/results.md).

Chunk size b (default 16) is part of the model (gradients at chunk-start weights); MAC's segment
length must be a multiple of it. Decoding token by token equals the parallel pass. Packed rows
(`segment_ids_BT`) run each document from the initial state on its own chunk (MAC: segment) grid
(docs/packed_documents.md).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from layers.attention import attend
from layers.base import Gain, MemoryInit, Stat, const, dense, sow
from layers.conv import CausalConv1D
from layers.norms import RMSNorm, l2_normalize, rms_normalize
from layers.packing import from_slots, realign, to_slots
from pallas_kernels._dispatch import check_implementation
from pallas_kernels.titans_memory import init_memory_state, memory_apply, titans_memory


@dataclasses.dataclass(frozen=True)
class TitansConfig:
  d_model: int
  num_heads: int
  memory_depth: int = 2
  expansion: int = 4
  chunk_size: int = 16
  theta_max: float | None = None  # None or 0: 1.0 for the linear memory, 0.3 / head_dim for the MLP
  theta_init: float = 0.5  # theta at init as a fraction of theta_max (b_theta = logit; 0.5: 0)
  num_persistent: int = 16
  conv_size: int = 4
  momentum: bool = True  # False: eta = 0 (plain GD; v1 Table 5's "w/o momentum" ablation)
  segment_len: int = 32  # MAC segment C (paper: 512)
  window: int = 64  # MAG / MAL sliding window (paper: 2048)
  implementation: str | None = None  # kernel path of the memory op (None: best available)

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "titans"))
    if self.d_model % self.num_heads:
      raise ValueError(f"titans: d_model={self.d_model} is not divisible by num_heads="
                       f"{self.num_heads}")
    if self.memory_depth < 1:
      raise ValueError(f"titans: memory_depth must be >= 1 (1 = linear memory), got "
                       f"{self.memory_depth}")
    if self.chunk_size < 1:
      raise ValueError(f"titans: chunk_size must be >= 1, got {self.chunk_size}")
    if self.segment_len % self.chunk_size:
      raise ValueError(f"titans: segment_len={self.segment_len} is not a multiple of chunk_size="
                       f"{self.chunk_size}; make the MAC segment a whole number of chunks")
    if not 0 < self.theta_init < 1:
      raise ValueError(f"titans: theta_init is theta's fraction of theta_max at init and must be in "
                       f"(0, 1), got {self.theta_init}")
    if self.num_persistent < 0 or self.window < 1 or self.expansion < 1 or self.conv_size < 1:
      raise ValueError("titans: num_persistent must be >= 0 and window, expansion, conv_size >= 1")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def theta_cap(self) -> float:
    """theta_max: the config's, else the calibrated default (docs/architectures/titans.md).

    With unit keys one write of step theta removes theta * e from the linear memory's error (the
    delta rule), so 1.0 is its natural cap. The LN'd MLP memory amplifies a write: at init one
    step moves M(k) along -e by about 1.1 * head_dim * theta at init (the table is in the docs),
    so 0.3 / head_dim gives the same ~0.3 fraction of the error per write at every head size.
    """
    if self.theta_max:
      return self.theta_max
    return 1.0 if self.memory_depth == 1 else 0.3 / self.head_dim


def memory_shapes(head_dim: int, expansion: int, depth: int) -> list[tuple[int, int]]:
  """[out, in] of each memory layer: W x at depth 1, else head_dim -> expansion * head_dim -> ...
  -> head_dim."""
  if depth == 1:
    return [(head_dim, head_dim)]
  e = expansion * head_dim
  return [(e, head_dim)] + [(e, e)] * (depth - 2) + [(head_dim, e)]


class NeuralMemory(nnx.Module):
  """The Titans LMM layer ; see the module docstring."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs, persistent: bool = True,
               output: bool = True):
    self.cfg = cfg
    d, h, dh, L = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.memory_depth
    self.wq = dense(rngs, (d, d), ("embed", "mlp"))
    self.wk = dense(rngs, (d, d), ("embed", "mlp"))
    self.wv = dense(rngs, (d, d), ("embed", "mlp"))
    self.conv_q = CausalConv1D(d, cfg.conv_size, rngs=rngs)
    self.conv_k = CausalConv1D(d, cfg.conv_size, rngs=rngs)
    self.conv_v = CausalConv1D(d, cfg.conv_size, rngs=rngs)
    self.w_theta = dense(rngs, (d, h * L), ("embed", None), std=0.02)
    # theta = theta_max * sigmoid(b_theta) at init; theta_init < 0.5 leaves the gate room above the
    # initial step (tried on Memora: docs/architectures/miras.md)
    self.b_theta = const(math.log(cfg.theta_init / (1 - cfg.theta_init)), (h * L,), (None,))
    self.w_eta = dense(rngs, (d, h), ("embed", None), std=0.02)
    self.b_eta = const(0.0, (h,), (None,))
    self.w_alpha = dense(rngs, (d, h), ("embed", None), std=0.02)
    # alpha ~ 0.001 at init (linear memory: 0.01): retention shrinks W and the LN'd memory's write
    # gain grows as 1/scale(W)^2 (docs/architectures/titans.md, "Retention gate at init").
    self.b_alpha = const(-4.6 if L == 1 else -6.9, (h,), (None,))
    if output:  # MAC and MAG combine the raw read-out with attention themselves
      self.w_gate = dense(rngs, (d, d), ("embed", "mlp"))
      self.wo = dense(rngs, (d, d), ("mlp", "embed"))
      self.out_norm_scale = const(1.0, (h, dh), ("heads", None), Gain)
    # Learned initial memory W_0 per head (a zero init gives a deep memory zero gradients).
    shapes = [(h, *s) for s in memory_shapes(dh, cfg.expansion, L)]
    self.w0 = nnx.List([
        MemoryInit(nnx.with_partitioning(
            nnx.initializers.normal(s[-1] ** -0.5), ("heads", None, None))(rngs.params(), s))
        for s in shapes])
    self.ln_scale = const(1.0, (h, dh), ("heads", None), Gain)
    self.ln_bias = const(0.0, (h, dh), ("heads", None), Gain)
    n_p = cfg.num_persistent if persistent else 0
    self.n_persistent = n_p
    self.persistent = dense(rngs, (n_p, d), (None, "embed"), std=1.0) if n_p else None

  # ---- state ----
  def _fresh_state(self, batch_size: int, dtype=jnp.float32):
    w0 = tuple(w[...] for w in self.w0)
    return {"mem": init_memory_state(w0, batch_size),
            "conv_q": self.conv_q.init_state(batch_size, dtype),
            "conv_k": self.conv_k.init_state(batch_size, dtype),
            "conv_v": self.conv_v.init_state(batch_size, dtype)}

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    """The memory after the persistent tokens. Its weights, momentum and conv taps are float32
    whatever `dtype` (the compute dtype): a recurrence accumulates over the whole sequence."""
    del max_len, dtype
    state = self._fresh_state(batch_size, jnp.float32)
    if self.persistent is not None:
      p = jnp.broadcast_to(self.persistent[...], (batch_size, *self.persistent.shape))
      _, state, _ = self.read_write(p, state, aligned=True)
    return state

  # ---- the memory as a map x -> (z_BTHD, state) ----
  def project(self, x_BTD, state, lengths_B=None, segment_ids_BT=None, reset=None):
    """q, k, v = SiLU(conv(x W)) with q, k L2-normalised per head, theta [B,T,H,L], the float32
    input for the other gates and the conv states (shared with Miras)."""
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    h, dh, L = cfg.num_heads, cfg.head_dim, cfg.memory_depth
    dt = x_BTD.dtype
    q, tq = self.conv_q(x_BTD @ self.wq[...].astype(dt), state=state["conv_q"], lengths_B=lengths_B,
                          segment_ids_BT=segment_ids_BT,
                          reset_tail=None if reset is None else reset["conv_q"])
    k, tk = self.conv_k(x_BTD @ self.wk[...].astype(dt), state=state["conv_k"], lengths_B=lengths_B,
                          segment_ids_BT=segment_ids_BT,
                          reset_tail=None if reset is None else reset["conv_k"])
    v, tv = self.conv_v(x_BTD @ self.wv[...].astype(dt), state=state["conv_v"], lengths_B=lengths_B,
                          segment_ids_BT=segment_ids_BT,
                          reset_tail=None if reset is None else reset["conv_v"])
    q = l2_normalize(jax.nn.silu(q).reshape(b, t, h, dh))
    k = l2_normalize(jax.nn.silu(k).reshape(b, t, h, dh))
    v = jax.nn.silu(v).reshape(b, t, h, dh)
    x32 = x_BTD.astype(jnp.float32)  # gates in float32: they enter the float32 state recurrence
    theta = cfg.theta_cap * jax.nn.sigmoid(x32 @ self.w_theta[...] + self.b_theta[...])
    convs = {"conv_q": tq, "conv_k": tk, "conv_v": tv}
    return q, k, v, theta.reshape(b, t, h, L), x32, convs

  def read_write(self, x_BTD, state, *, lengths_B=None, aligned: bool = False,
                 segment_ids_BT=None):
    """Returns (z_BTHD, new_state, stats): the raw memory read-out after each write.

    With `segment_ids_BT` (packed documents) every document after the first starts from the
    learned initial state at a chunk start of its own: the row is spread over slots
    (`layers.packing`), the memory resets where a document starts, and the reads come back.
    """
    if segment_ids_BT is not None:
      if lengths_B is not None:
        raise ValueError("titans: pass either lengths_B or segment_ids_BT, not both")
      r = realign(segment_ids_BT, self.cfg.chunk_size, offset_B=state["mem"]["phase"])
      z, state, stats = self._read_write(to_slots(x_BTD, r), state, lengths_B=r.lengths_B,
                                         aligned=aligned, segments=r)
      return from_slots(z, r), state, stats
    return self._read_write(x_BTD, state, lengths_B=lengths_B, aligned=aligned)

  def reset_state(self, batch_size: int):
    """The state every packed document starts from (after the persistent tokens)."""
    if self.n_persistent % self.cfg.chunk_size:
      raise ValueError(f"titans: packed documents need num_persistent ({self.n_persistent}) to be "
                       f"a multiple of chunk_size ({self.cfg.chunk_size}), so that each document "
                       "starts its memory on a chunk boundary; change either")
    return self.init_state(batch_size)

  def _read_write(self, x_BTD, state, *, lengths_B=None, aligned=False, segments=None):
    cfg = self.cfg
    b = x_BTD.shape[0]
    seg = None if segments is None else segments.segment_ids_BS
    reset = None if segments is None else self.reset_state(b)
    q, k, v, theta, x32, convs = self.project(x_BTD, state, lengths_B, seg, reset)
    eta = jax.nn.sigmoid(x32 @ self.w_eta[...] + self.b_eta[...])
    if not cfg.momentum:
      eta = jnp.zeros_like(eta)
    log_a = jax.nn.log_sigmoid(-(x32 @ self.w_alpha[...] + self.b_alpha[...]))
    z, mem = titans_memory(q, k, v, theta, eta, log_a, self.ln_scale[...], self.ln_bias[...],
                           state=state["mem"], chunk_size=cfg.chunk_size,
                           implementation=cfg.implementation, lengths=lengths_B,
                           assume_aligned=aligned,
                           resets_BT=None if segments is None else segments.starts_BS,
                           reset_state=None if reset is None else reset["mem"])
    # Memory statistics, dead code unless the trainer captures `Stat` (XLA drops them otherwise):
    # surprise = ||M_{W_base}(k) - v|| (the inner-loss gradient's output factor), the mean gates
    # and the memory weight norm per example.
    err = (memory_apply(state["mem"]["w"], self.ln_scale[...], self.ln_bias[...],
                        k.astype(jnp.float32)) - v.astype(jnp.float32))
    stats = {"surprise_norm": jnp.mean(jnp.linalg.norm(err, axis=-1)),
             "theta_mean": jnp.mean(theta), "eta_mean": jnp.mean(eta),
             "decay_mean": jnp.mean(-jnp.expm1(log_a)),
             "memory_weight_norm": jnp.sqrt(sum(jnp.sum(w.astype(jnp.float32) ** 2)
                                                for w in mem["w"]) / b)}
    return z, {"mem": mem, **convs}, stats

  def sow_stats(self, stats) -> None:
    for name, value in stats.items():
      sow(self, Stat, name, jnp.mean(value))

  def output(self, z_BTHD, x_BTD):
    b, t, _ = x_BTD.shape
    dt = x_BTD.dtype
    zn = rms_normalize(z_BTHD.astype(dt)) * self.out_norm_scale[...].astype(dt)
    gate = jax.nn.silu(x_BTD @ self.w_gate[...].astype(dt))
    return (zn.reshape(b, t, -1) * gate) @ self.wo[...].astype(dt)

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    aligned = state is None and self.n_persistent % self.cfg.chunk_size == 0
    state = self.init_state(x_BTD.shape[0]) if state is None else state
    z, state, stats = self.read_write(x_BTD, state, aligned=aligned, segment_ids_BT=segment_ids_BT)
    self.sow_stats(stats)
    return self.output(z, x_BTD), state


class _GatedCombine(nnx.Module):
  """o = W_o[RMSNorm(y) * sigmoid(RMSNorm(z))] (MAC Eq. 25, MAG Eq. 28; the exact form is ours)."""

  def __init__(self, d: int, *, rngs: nnx.Rngs):
    self.norm_y = RMSNorm(d)
    self.norm_z = RMSNorm(d)
    self.wo = dense(rngs, (d, d), ("mlp", "embed"))

  def __call__(self, y_BTD, z_BTD):
    dt = y_BTD.dtype
    g = jax.nn.sigmoid(self.norm_z(z_BTD.astype(dt)))
    return (self.norm_y(y_BTD) * g) @ self.wo[...].astype(dt)


class MAG(nnx.Module):
  """Memory as a Gate (v1 Eq. 26-28): SWA over [P; x] and the LMM over [P; x], gated."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    from layers.attention import Attention, AttentionConfig
    self.cfg = cfg
    self.memory = NeuralMemory(cfg, rngs=rngs, persistent=True, output=False)
    self.attn = Attention(AttentionConfig(cfg.d_model, cfg.num_heads, window=cfg.window),
                          rngs=rngs)
    self.combine = _GatedCombine(cfg.d_model, rngs=rngs)

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    return {"memory": self.memory.init_state(batch_size),
            "attn": self.attn.init_state(batch_size, max_len=max_len, dtype=dtype)}

  def _prefix(self):
    return None if self.memory.persistent is None else self.memory.persistent[...]

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    b, t, d = x_BTD.shape
    aligned = state is None and self.memory.n_persistent % self.cfg.chunk_size == 0
    mem_state = self.memory.init_state(b) if state is None else state["memory"]
    y, attn_state = self.attn(x_BTD, state=None if state is None else state["attn"],
                              segment_ids_BT=segment_ids_BT, prefix_PD=self._prefix())
    z, mem_state, stats = self.memory.read_write(x_BTD, mem_state, aligned=aligned,
                                                 segment_ids_BT=segment_ids_BT)
    self.memory.sow_stats(stats)
    return self.combine(y, z.reshape(b, t, d)), {"memory": mem_state, "attn": attn_state}


class MAL(nnx.Module):
  """Memory as a Layer (v1 Eq. 29-31): y = LMM([P; x]), o = SWA(y) with the prefix P visible.

  Returned as the sum of both sub-layer outputs so the block's residual stream carries
  x + LMM(x) + SWA(RMSNorm(x + LMM(x))) [ours: the paper's "Samba-like" stacking inside one mixer].
  """

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    from layers.attention import Attention, AttentionConfig
    self.cfg = cfg
    self.memory = NeuralMemory(cfg, rngs=rngs, persistent=True)
    self.norm = RMSNorm(cfg.d_model)
    self.attn = Attention(AttentionConfig(cfg.d_model, cfg.num_heads, window=cfg.window),
                          rngs=rngs)

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    return {"memory": self.memory.init_state(batch_size),
            "attn": self.attn.init_state(batch_size, max_len=max_len, dtype=dtype)}

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    z, mem_state = self.memory(x_BTD, state=None if state is None else state["memory"],
                               segment_ids_BT=segment_ids_BT)
    prefix = None if self.memory.persistent is None else self.memory.persistent[...]
    y, attn_state = self.attn(self.norm(x_BTD + z), state=None if state is None else state["attn"],
                              segment_ids_BT=segment_ids_BT, prefix_PD=prefix)
    return z + y, {"memory": mem_state, "attn": attn_state}


class MAC(nnx.Module):
  """Memory as a Context (v1 Eq. 21-25), segment by segment; see the module docstring.

  A call may start mid-segment (state["pos"] % C != 0): the sequence is placed at that offset in
  a grid of whole segments and scanned segment by segment; the current segment's attention keys
  live in the state, and the memory's update runs over each segment's real tokens only. The grid
  is shared by the batch: every row of a carried state must sit at the same position modulo C (as
  batched decoding does); a row that does not gets NaN outputs rather than a misplaced segment.
  """

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    from layers.attention import Attention, AttentionConfig
    self.cfg = cfg
    d = cfg.d_model
    self.memory = NeuralMemory(cfg, rngs=rngs, persistent=False, output=False)
    self.w_qr = dense(rngs, (d, d), ("embed", "mlp"))  # retrieval query, its own projection [ours]
    self.attn = Attention(AttentionConfig(d, cfg.num_heads), rngs=rngs)
    n_p = cfg.num_persistent
    self.persistent = dense(rngs, (n_p, d), (None, "embed"), std=1.0) if n_p else None
    self.mem_norm = RMSNorm(d)
    self.combine = _GatedCombine(d, rngs=rngs)

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    del max_len
    c, h, dh = self.cfg.segment_len, self.cfg.num_heads, self.cfg.head_dim
    mem = self.memory.init_state(batch_size)
    zeros = jnp.zeros((batch_size, c, h, dh), jnp.float32)
    return {"memory": mem, "w_seg": mem["mem"]["w"], "kh": zeros, "vh": zeros, "kx": zeros,
            "vx": zeros, "pos": jnp.zeros((batch_size,), jnp.int32)}

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    """Packed documents (`segment_ids_BT`): every document after the first starts a segment of its
    own from the initial memory (the row is spread over slots, `layers.packing`)."""
    cfg = self.cfg
    c = cfg.segment_len
    fresh = state is None
    state = self.init_state(x_BTD.shape[0]) if fresh else state
    if segment_ids_BT is None:
      return self._segments(x_BTD, state, fresh=fresh)
    r = realign(segment_ids_BT, c, offset_B=state["pos"] % c)
    y, state = self._segments(to_slots(x_BTD, r), state, fresh=fresh, segments=r)
    return from_slots(y, r), state

  def _segments(self, x_BTD, state, *, fresh: bool, segments=None):
    cfg = self.cfg
    b, t, d = x_BTD.shape
    c, h, dh = cfg.segment_len, cfg.num_heads, cfg.head_dim
    dt = x_BTD.dtype
    # A fresh sequence starts at a segment (and chunk) boundary: no extra segment, and when every
    # segment is full (and real) the memory op can skip its phase handling.
    aligned = fresh and t % c == 0 and segments is None
    if fresh:
      p0, n_seg = 0, -(-t // c)
    else:
      p0, n_seg = state["pos"][0] % c, -(-(t + c - 1) // c)
    n_tok = jnp.full((b,), t, jnp.int32) if segments is None else segments.lengths_B
    if segments is not None:  # per segment: does a document start it? (then the memory resets)
      starts = jax.lax.dynamic_update_slice(jnp.zeros((b, n_seg * c), bool), segments.starts_BS,
                                            (jnp.int32(0), jnp.asarray(p0, jnp.int32)))
      resets_SB = starts.reshape(b, n_seg, c)[:, :, 0].T
      init_mem = self.memory.init_state(b)
    zero = jnp.zeros((), jnp.int32)
    x_pad = jax.lax.dynamic_update_slice(jnp.zeros((b, n_seg * c, d), dt), x_BTD,
                                         (zero, jnp.asarray(p0, jnp.int32), zero))
    xs_SBCD = rearrange(x_pad, "b (s c) d -> s b c d", c=c)
    positions = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    causal = jnp.tril(jnp.ones((c, c), bool))
    mem_params = (self.memory.ln_scale[...], self.memory.ln_bias[...])
    if self.persistent is not None:
      pk, pv = self.attn.prefix_kv(self.persistent[...].astype(dt), b)
    n_p = 0 if self.persistent is None else self.persistent.shape[0]
    mask = jnp.concatenate([jnp.ones((c, n_p), bool), causal, causal], axis=1)
    mask = jnp.broadcast_to(mask, (b, c, n_p + 2 * c))

    def body(carry, inp):
      mem_state, w_seg, cache = carry
      s_idx, xs, *reset = inp
      if reset:
        rb = lambda n_, o: jnp.where(reset[0].reshape((b,) + (1,) * (o.ndim - 1)), n_, o)
        mem_state = jax.tree.map(rb, init_mem, mem_state)
        w_seg = jax.tree.map(rb, init_mem["mem"]["w"], w_seg)
      start = jnp.where(s_idx == 0, p0, 0)
      end = jnp.clip(p0 + n_tok - s_idx * c, 0, c)               # [B]
      n = jnp.maximum(end - start, 0)
      # 1. Retrieve (read-only) from the memory as it was at the segment start.
      qr = l2_normalize(jax.nn.silu(xs @ self.w_qr[...].astype(dt)).reshape(b, c, h, dh))
      hist = memory_apply(w_seg, *mem_params, qr.astype(jnp.float32)).reshape(b, c, d).astype(dt)
      # 2. Attend over [P; h; x_seg], causal in h and x; earlier tokens of this segment from cache.
      qx, kx, vx = self.attn.qkv(xs, positions)
      _, kh, vh = self.attn.qkv(hist, positions)
      if not aligned:
        old = (jnp.arange(c) < start)[None, :, None, None]
        kh, vh, kx, vx = (jnp.where(old, cache[n_].astype(dt), new)
                          for n_, new in (("kh", kh), ("vh", vh), ("kx", kx), ("vx", vx)))
      keys = [kh, kx] if self.persistent is None else [pk, kh, kx]
      vals = [vh, vx] if self.persistent is None else [pv, vh, vx]
      y = self.attn.project_out(attend(qx, jnp.concatenate(keys, 1), jnp.concatenate(vals, 1),
                                       mask))
      # 3. Write the memory with the attention block's output RMSNorm(x + y) (real tokens only),
      # reading after each write.
      ym = self.mem_norm(xs + y)
      new_cache = {"kh": kh.astype(jnp.float32), "vh": vh.astype(jnp.float32),
                   "kx": kx.astype(jnp.float32), "vx": vx.astype(jnp.float32)}
      if aligned:  # every segment full and real: no shifts, no keep-or-replace selects
        z, new_mem, stats = self.memory.read_write(ym, mem_state, aligned=True)
        out = self.combine(y, z.reshape(b, c, d))
        return (new_mem, new_mem["mem"]["w"], new_cache), (out, stats)
      y_shift = jnp.roll(ym, -start, axis=1)
      z, new_mem, stats = self.memory.read_write(y_shift, mem_state, lengths_B=n)
      z = jnp.roll(z.reshape(b, c, d), start, axis=1)
      out = self.combine(y, z)
      has = n > 0
      per_row = lambda f: (lambda a, o: jnp.where(f.reshape((b,) + (1,) * (o.ndim - 1)), a, o))
      keep = lambda new, old_: jax.tree.map(per_row(has), new, old_)
      mem_state = keep(new_mem, mem_state)
      w_seg = jax.tree.map(per_row(has & (end == c)), new_mem["mem"]["w"], w_seg)
      cache = keep(new_cache, cache)
      stats = {k: jnp.where(jnp.any(has), v, jnp.nan) for k, v in stats.items()}
      return (mem_state, w_seg, cache), (out, stats)

    cache0 = {k: state[k] for k in ("kh", "vh", "kx", "vx")}
    carry = (state["memory"], state["w_seg"], cache0)
    scanned = (jnp.arange(n_seg), xs_SBCD) + (() if segments is None else (resets_SB,))
    if n_seg <= 8 and segments is None:
      # Few segments (training at CPU sizes, decode steps): unrolled, so XLA optimises across
      # segments and skips the while-loop bookkeeping (measured 1.7x faster fwd+bwd at T=64).
      # Packed rows scan: each segment there runs the memory's general (phase-shifted) path, whose
      # unrolled copies made even a short packed row slow to compile (docs/results.md).
      outs, stats = [], []
      for i in range(n_seg):
        carry, (o_i, st_i) = body(carry, jax.tree.map(lambda a: a[i], scanned))
        outs.append(o_i)
        stats.append(st_i)
      outs = jnp.stack(outs)
      stats = jax.tree.map(lambda *a: jnp.stack(a), *stats)
      mem_state, w_seg, cache = carry
    else:
      (mem_state, w_seg, cache), (outs, stats) = jax.lax.scan(body, carry, scanned)
    self.memory.sow_stats({k: jnp.nanmean(v) for k, v in stats.items()})
    o = jax.lax.dynamic_slice_in_dim(rearrange(outs, "s b c d -> b (s c) d"), p0, t, axis=1)
    if not fresh:  # the segment grid is shared by the batch: a row off it is NaN, never wrong
      o = jnp.where((state["pos"] % c == p0)[:, None, None], o, jnp.nan)
    new_state = {"memory": mem_state, "w_seg": w_seg, **cache, "pos": state["pos"] + n_tok}
    return o, new_state
