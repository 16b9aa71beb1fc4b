"""Miras: Moneta, Yaad and Memora (Behrouz et al., "It's All Connected", arXiv 2504.13173).

Reference: ../shared/reference/titans_miras.md §7 (and §1-4 for the shared Titans engine).

`Miras` (registered `moneta`, `yaad`, `memora`) is the Titans memory layer (§4, `layers.titans.
NeuralMemory`) with the memory op swapped for a Miras memory (`pallas_kernels.miras_memory`):

    q, k, v = SiLU(CausalConv_4(x W_{q,k,v}));  q, k <- L2-normalised per head
    theta = theta_max * sigmoid(x W_theta + b_theta)     per token, head and memory layer
    a     = sigmoid(x W_a + b_a)                         retention factor, per token and head
    delta = softplus(x W_delta + b_delta)                Huber threshold (Yaad), per token and head
    z = Memory(q, k, v, theta, a, delta)                 plain GD, chunked (gradients at the chunk base)
    o = W_o concat_h(RMSNorm_h(z) * SiLU(x W_g))

    Moneta: l_3 bias, l_4 retention on a dual state A, W = phi_4(A)  (Eq. 24-25; rescaled map [ours])
    Yaad:   Huber bias, l2 retention                                  (Eq. 26)
    Memora: l2 bias, KL retention on logits Z, W = c softmax_row(Z)   (Eq. 21, 27), with the
            paper's lag token (the first token of each chunk takes its own exact step, §7.3)

Choices [ours] (§7.1): the paper's channel-wise gates from low-rank projections become scalars per
(head, memory layer) for theta and per head for a and delta (the op's interface); b_a = 4.6 (a ~ 0.99),
b_delta = 0.5413 (delta = 1), b_theta = 0; theta_max = 0.1 for the MLP memory, 1.0 for the linear
one, as in Titans. The initial state (W_0, A_0 or Z_0) and Memora's scale c (init 1) are learned per
head and memory layer. Memora's lag token is not implemented (see the op). Persistent tokens
(num_persistent > 0) are consumed first, as in Titans: `init_state` runs the memory over them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.base import Stat, reject_segment_ids, sow
from layers.conv import CausalConv1D
from layers.norms import l2_normalize, rms_normalize
from pallas_kernels.miras_memory import MODELS, init_miras_state, miras_memory


@dataclasses.dataclass(frozen=True)
class MirasConfig:
  d_model: int
  num_heads: int
  model: str = "moneta"  # moneta | yaad | memora
  memory_depth: int = 2
  expansion: int = 4
  chunk_size: int = 16
  num_persistent: int = 0
  conv_size: int = 4
  implementation: str | None = None  # kernel path of the memory op (None: best available)
  theta_max: float | None = None  # None or 0: 1.0 for the linear memory, 0.1 for the MLP [ours]
  p: float = 3.0  # Moneta's l_p attentional bias
  q_norm: float = 4.0  # Moneta's l_q retention

  def __post_init__(self):
    if self.implementation == "":
      object.__setattr__(self, "implementation", None)
    if self.model not in MODELS:
      raise ValueError(f"miras: unknown model {self.model!r}; choose one of {sorted(MODELS)}")
    if self.d_model % self.num_heads:
      raise ValueError(f"miras: d_model={self.d_model} is not divisible by num_heads="
                       f"{self.num_heads}")
    if self.memory_depth < 1 or self.chunk_size < 1 or self.expansion < 1 or self.conv_size < 1:
      raise ValueError("miras: memory_depth, chunk_size, expansion and conv_size must be >= 1")
    if self.num_persistent < 0:
      raise ValueError(f"miras: num_persistent must be >= 0, got {self.num_persistent}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def theta_cap(self) -> float:
    if self.theta_max:
      return self.theta_max
    return 1.0 if self.memory_depth == 1 else 0.1


def _dense(rngs, shape, axes, std=None):
  init = nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))


def _const(value, shape, axes):
  return nnx.Param(nnx.with_partitioning(nnx.initializers.constant(value), axes)(
      jax.random.PRNGKey(0), shape))


class Miras(nnx.Module):
  """A Miras memory layer (Moneta / Yaad / Memora by `cfg.model`); see the module docstring."""

  def __init__(self, cfg: MirasConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, dh, L = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.memory_depth
    self.bias, self.retention = MODELS[cfg.model]
    self.wq = _dense(rngs, (d, d), ("embed", "mlp"))
    self.wk = _dense(rngs, (d, d), ("embed", "mlp"))
    self.wv = _dense(rngs, (d, d), ("embed", "mlp"))
    self.conv_q = CausalConv1D(d, cfg.conv_size, rngs=rngs)
    self.conv_k = CausalConv1D(d, cfg.conv_size, rngs=rngs)
    self.conv_v = CausalConv1D(d, cfg.conv_size, rngs=rngs)
    self.w_theta = _dense(rngs, (d, h * L), ("embed", None), std=0.02)
    self.b_theta = _const(0.0, (h * L,), (None,))
    self.w_a = _dense(rngs, (d, h), ("embed", None), std=0.02)
    self.b_a = _const(4.6, (h,), (None,))  # a ~ 0.99 at init
    self.w_delta = _dense(rngs, (d, h), ("embed", None), std=0.02)
    self.b_delta = _const(0.5413, (h,), (None,))  # softplus(0.5413) = 1
    self.w_gate = _dense(rngs, (d, d), ("embed", "mlp"))
    self.wo = _dense(rngs, (d, d), ("mlp", "embed"))
    self.out_norm_scale = _const(1.0, (h, dh), ("heads", None))
    if L == 1:
      shapes = [(h, dh, dh)]
    else:
      e = cfg.expansion * dh
      shapes = [(h, e, dh)] + [(h, e, e)] * (L - 2) + [(h, dh, e)]
    # Learned initial state: W_0 (Yaad), the dual A_0 (Moneta) or logits Z_0 (Memora, unit-scale
    # logits so the initial rows are not uniform).
    std = (lambda s: 1.0) if self.retention == "kl" else (lambda s: s[-1] ** -0.5)
    self.x0 = nnx.List([
        nnx.Param(nnx.with_partitioning(nnx.initializers.normal(std(s)), ("heads", None, None))(
            rngs.params(), s)) for s in shapes])
    self.kl_scale = _const(1.0, (h, L), ("heads", None))
    self.ln_scale = _const(1.0, (h, dh), ("heads", None))
    self.ln_bias = _const(0.0, (h, dh), ("heads", None))
    n_p = cfg.num_persistent
    self.persistent = _dense(rngs, (n_p, d), (None, "embed"), std=1.0) if n_p else None

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    del max_len
    state = {"mem": init_miras_state(tuple(x[...] for x in self.x0), batch_size, self.retention),
             "conv_q": self.conv_q.init_state(batch_size, jnp.float32),
             "conv_k": self.conv_k.init_state(batch_size, jnp.float32),
             "conv_v": self.conv_v.init_state(batch_size, jnp.float32)}
    if self.persistent is not None:
      p = jnp.broadcast_to(self.persistent[...], (batch_size, *self.persistent.shape))
      _, state, _ = self.read_write(p, state, aligned=True)
    return state

  def read_write(self, x_BTD, state, *, aligned: bool = False):
    """Returns (z_BTHD, new_state, stats): the raw memory read-out after each write."""
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    h, dh, L = cfg.num_heads, cfg.head_dim, cfg.memory_depth
    dt = x_BTD.dtype
    q, tq = self.conv_q(x_BTD @ self.wq[...].astype(dt), state=state["conv_q"])
    k, tk = self.conv_k(x_BTD @ self.wk[...].astype(dt), state=state["conv_k"])
    v, tv = self.conv_v(x_BTD @ self.wv[...].astype(dt), state=state["conv_v"])
    q = l2_normalize(jax.nn.silu(q).reshape(b, t, h, dh))
    k = l2_normalize(jax.nn.silu(k).reshape(b, t, h, dh))
    v = jax.nn.silu(v).reshape(b, t, h, dh)
    x32 = x_BTD.astype(jnp.float32)  # gates in float32: they enter the float32 state recurrence
    theta = cfg.theta_cap * jax.nn.sigmoid(x32 @ self.w_theta[...] + self.b_theta[...])
    theta = theta.reshape(b, t, h, L)
    a = jax.nn.sigmoid(x32 @ self.w_a[...] + self.b_a[...])
    delta = jax.nn.softplus(x32 @ self.w_delta[...] + self.b_delta[...])
    z, mem = miras_memory(q, k, v, theta, a, delta, self.ln_scale[...], self.ln_bias[...],
                          state=state["mem"], bias=self.bias, p=cfg.p, retention=self.retention,
                          q_norm=cfg.q_norm, kl_scale_HL=self.kl_scale[...],
                          lag_token=cfg.model == "memora",
                          chunk_size=cfg.chunk_size, assume_aligned=aligned,
                          implementation=cfg.implementation)
    stats = {"theta_mean": jnp.mean(theta), "retention_mean": jnp.mean(a),
             "delta_mean": jnp.mean(delta)}
    return z, {"mem": mem, "conv_q": tq, "conv_k": tk, "conv_v": tv}, stats

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    reject_segment_ids(f"miras ({self.cfg.model})", segment_ids_BT)
    cfg = self.cfg
    aligned = state is None and cfg.num_persistent % cfg.chunk_size == 0
    state = self.init_state(x_BTD.shape[0]) if state is None else state
    z, state, stats = self.read_write(x_BTD, state, aligned=aligned)
    for name, value in stats.items():
      sow(self, Stat, name, value)
    b, t, _ = x_BTD.shape
    dt = x_BTD.dtype
    zn = rms_normalize(z.astype(dt)) * self.out_norm_scale[...].astype(dt)
    gate = jax.nn.silu(x_BTD @ self.w_gate[...].astype(dt))
    return (zn.reshape(b, t, -1) * gate) @ self.wo[...].astype(dt), state
