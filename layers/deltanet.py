"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025, arXiv 2412.06464,
Eq. 10):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = K^-1/2 S_t^T q_t

Layer (docs/architectures/gated_deltanet.md, as FLA's GatedDeltaNet):
  q, k, v = SiLU(CausalConv_4(x W_{q,k,v})); q, k L2-normalised per head
  beta = sigmoid(x W_b);  g = log a = -exp(A_log) * softplus(x W_a + dt_bias)   (Mamba-2 style)
  o = W_o concat_h(RMSNorm_h(o_h) * SiLU(x W_gate))       gated RMSNorm, swish gate [uncertain]
The recurrence is `pallas_kernels.gated_delta_rule` (chunked WY form); the state is S plus the three
conv tails. `segment_ids_BT` resets S and the conv taps at document boundaries.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.base import dense
from layers.conv import CausalConv1D
from layers.norms import l2_normalize, rms_normalize
from pallas_kernels import gated_delta_rule
from pallas_kernels._dispatch import check_implementation


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
  d_model: int
  num_heads: int
  head_dim: int | None = None  # K = V = head_dim; default d_model / num_heads
  conv_size: int = 4
  chunk_size: int = 64
  implementation: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "gated_deltanet"))
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"gated_deltanet: d_model={self.d_model} is not divisible by num_heads="
                       f"{self.num_heads}; set head_dim or change num_heads")
    if self.chunk_size < 1 or self.conv_size < 1:
      raise ValueError("gated_deltanet: chunk_size and conv_size must be >= 1")

  @property
  def dk(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


def mamba_decay_params(num_heads: int, rngs: nnx.Rngs):
  """A_log ~ log U(1, 16) and dt_bias = softplus^-1(dt), dt ~ logU(1e-3, 1e-1) (Mamba-2 init)."""
  k1, k2 = jax.random.split(rngs.params())
  a = jax.random.uniform(k1, (num_heads,), minval=1.0, maxval=16.0)
  dt = jnp.exp(jax.random.uniform(k2, (num_heads,)) * (math.log(0.1) - math.log(1e-3))
               + math.log(1e-3))
  dt_bias = dt + jnp.log(-jnp.expm1(-dt))
  return nnx.Param(jnp.log(a)), nnx.Param(dt_bias)


def log_decay(a_BTH, A_log_H, dt_bias_H):
  return -jnp.exp(A_log_H) * jax.nn.softplus(a_BTH.astype(jnp.float32) + dt_bias_H)


class GatedOutput(nnx.Module):
  """W_o concat_h(RMSNorm_h(o_h) * SiLU(x W_gate)) shared by Gated DeltaNet and MoM."""

  def __init__(self, d_model: int, num_heads: int, dv: int, *, rngs: nnx.Rngs):
    self.w_gate = dense(rngs, (d_model, num_heads * dv), ("embed", "mlp"))
    self.scale = nnx.Param(jnp.ones((dv,), jnp.float32))
    self.wo = dense(rngs, (num_heads * dv, d_model), ("mlp", "embed"))

  def __call__(self, o_BTHV, x_BTD):
    b, t, _ = x_BTD.shape
    dt = x_BTD.dtype
    o = rms_normalize(o_BTHV.astype(dt)) * self.scale[...].astype(dt)
    gate = jax.nn.silu(x_BTD @ self.w_gate[...].astype(dt))
    return (o.reshape(b, t, -1) * gate) @ self.wo[...].astype(dt)


class GatedDeltaNet(nnx.Module):

  def __init__(self, cfg: GatedDeltaNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, dk = cfg.d_model, cfg.num_heads, cfg.dk
    self.wq = dense(rngs, (d, h * dk), ("embed", "mlp"))
    self.wk = dense(rngs, (d, h * dk), ("embed", "mlp"))
    self.wv = dense(rngs, (d, h * dk), ("embed", "mlp"))
    self.wb = dense(rngs, (d, h), ("embed", None), std=0.02)
    self.wa = dense(rngs, (d, h), ("embed", None), std=0.02)
    self.A_log, self.dt_bias = mamba_decay_params(h, rngs)
    self.conv_q = CausalConv1D(h * dk, cfg.conv_size, rngs=rngs)
    self.conv_k = CausalConv1D(h * dk, cfg.conv_size, rngs=rngs)
    self.conv_v = CausalConv1D(h * dk, cfg.conv_size, rngs=rngs)
    self.out = GatedOutput(d, h, dk, rngs=rngs)

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    del max_len
    h, dk = self.cfg.num_heads, self.cfg.dk
    return {"S": jnp.zeros((batch_size, h, dk, dk), jnp.float32),
            "conv_q": self.conv_q.init_state(batch_size, dtype),
            "conv_k": self.conv_k.init_state(batch_size, dtype),
            "conv_v": self.conv_v.init_state(batch_size, dtype)}

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    h, dk = cfg.num_heads, cfg.dk
    dt = x_BTD.dtype
    state = self.init_state(b, dtype=dt) if state is None else state
    q, cq = self.conv_q(x_BTD @ self.wq[...].astype(dt), state=state["conv_q"].astype(dt),
                        segment_ids_BT=segment_ids_BT)
    k, ck = self.conv_k(x_BTD @ self.wk[...].astype(dt), state=state["conv_k"].astype(dt),
                        segment_ids_BT=segment_ids_BT)
    v, cv = self.conv_v(x_BTD @ self.wv[...].astype(dt), state=state["conv_v"].astype(dt),
                        segment_ids_BT=segment_ids_BT)
    q = l2_normalize(jax.nn.silu(q).reshape(b, t, h, dk))
    k = l2_normalize(jax.nn.silu(k).reshape(b, t, h, dk))
    v = jax.nn.silu(v).reshape(b, t, h, dk)
    beta = jax.nn.sigmoid((x_BTD @ self.wb[...].astype(dt)).astype(jnp.float32))
    g = log_decay(x_BTD @ self.wa[...].astype(dt), self.A_log[...], self.dt_bias[...])
    o, S = gated_delta_rule(q, k, v, beta, g, initial_state=state["S"], segment_ids=segment_ids_BT,
                            chunk_size=cfg.chunk_size, implementation=cfg.implementation)
    new_state = {"S": S, "conv_q": cq.astype(state["conv_q"].dtype),
                 "conv_k": ck.astype(state["conv_k"].dtype), "conv_v": cv.astype(state["conv_v"].dtype)}
    return self.out(o, x_BTD), new_state
