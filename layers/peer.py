"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts",
arXiv:2407.04153 section 2, Algorithm 1; docs/architectures/peer.md).

N = n^2 singleton experts e_i(x) = act(u_i . x) v_i (no biases). Each of h heads forms a query
q^i(x) = norm(W_q^i x), retrieves its top-k experts I^i over the product keys [c_a; c'_b] exactly
(`layers.routing.product_key_topk`), and weights them with a softmax over its k selected scores:

    f(x) = sum_i sum_{j in I^i} g_j act(u_j . x) v_j,   g = softmax over head i's k scores.

The expert read goes through `pallas_kernels.expert_gather.expert_mlp` (custom VJP, sorted
segment-sum table gradients).

Choices where the paper is silent [ours]:
  - Query norm: per-token, per-half LayerNorm without affine parameters (`query_norm="layernorm"`;
    also "rmsnorm" or "none"). No BatchNorm: its batch statistics would let routing at position t see
    later tokens of the same sequence.
  - `shared_subkeys=True`: all heads share one pair of sub-key sets, as in the paper; False gives each
    head its own (as public ports do).
  - d_k = d_model / 2 by default; activation exact GELU.
  - Init: u ~ N(0, 1/d); sub-keys ~ N(0, 2/d_k) so each half-score is ~N(0, 1) for a normalised
    query; std(v) makes the output std at init that of a freshly initialised SwiGLU (`layers.mlp`) on
    unit-variance input, using E[g^2] ~ 1/k for the k softmax weights of a head.
  - Routing (scores, top-k, softmax) runs in float32 (float64 for float64 inputs) whatever the
    activation dtype, so bf16 rounding does not create ties; the tables are read in float32 and the
    gathered rows cast to the activation dtype, so a huge table is never copied.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import base, routing
from pallas_kernels._dispatch import check_implementation
from pallas_kernels.expert_gather import expert_mlp
from pallas_kernels.expert_gather._common import ACTIVATIONS
from pallas_kernels.expert_gather.xla import DEFAULT_CHUNK

QUERY_NORMS = ("layernorm", "rmsnorm", "none")


@dataclasses.dataclass(frozen=True)
class PEERConfig:
  d_model: int
  num_subkeys: int = 128          # n; N = n^2 experts (paper: 1024)
  num_heads: int = 8              # h
  top_k: int = 16                 # k per head
  d_key: int | None = None        # d_k, even; default d_model // 2 [ours]
  shared_subkeys: bool = True     # one sub-key pair for all heads, as in the paper [ours: flag]
  query_norm: str = "layernorm"   # per-half, per-token [ours]
  activation: str = "gelu"
  value_init_std: float | None = None  # None: match a SwiGLU's output std at init [ours]
  chunk_size: int = DEFAULT_CHUNK
  implementation: str | None = None     # expert_gather implementation

  @property
  def num_experts(self) -> int:
    return self.num_subkeys ** 2

  @property
  def dk(self) -> int:
    return self.d_key or 2 * max(1, self.d_model // 4)

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "peer"))
    if self.dk % 2:
      raise ValueError(f"peer: d_key must be even (two halves), got {self.dk}")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"peer: need 1 <= top_k <= num_subkeys^2 = {self.num_experts}, "
                       f"got top_k={self.top_k}")
    if self.query_norm not in QUERY_NORMS:
      raise ValueError(f"peer: query_norm must be one of {QUERY_NORMS} (no BatchNorm: it leaks "
                       f"future tokens), got {self.query_norm!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"peer: unknown activation {self.activation!r}")


def _gauss_mean(f, num: int = 96) -> float:
  """E[f(a)] for a ~ N(0, 1) by Gauss-Hermite quadrature (probabilists' weights)."""
  a, w = np.polynomial.hermite_e.hermegauss(num)
  return float(np.sum(w * f(a)) / np.sqrt(2 * np.pi))


def swiglu_output_var() -> float:
  """Output variance of a fresh lecun-normal SwiGLU on unit-variance input: E[silu(a)^2]."""
  return _gauss_mean(lambda a: (a / (1 + np.exp(-a))) ** 2)


def _act_np(name):
  erf = np.vectorize(math.erf)
  return {"gelu": lambda a: 0.5 * a * (1 + erf(a / np.sqrt(2))), "relu": lambda a: np.maximum(a, 0),
          "silu": lambda a: a / (1 + np.exp(-a)), "identity": lambda a: a}[name]


def peer_value_std(cfg: PEERConfig) -> float:
  """std(v) so that Var(f(x)) = h * E[sum_k g^2] * E[act(z)^2] * std(v)^2 matches a SwiGLU's [ours]."""
  act_sq = _gauss_mean(lambda a: _act_np(cfg.activation)(a) ** 2)
  return math.sqrt(swiglu_output_var() * cfg.top_k / (cfg.num_heads * act_sq))


def normalize_query(q, kind: str, eps: float = 1e-6):
  """Per-token normalisation over the last axis (never across the batch)."""
  if kind == "none":
    return q
  if kind == "layernorm":
    q = q - jnp.mean(q, axis=-1, keepdims=True)
  return q * jax.lax.rsqrt(jnp.mean(q * q, axis=-1, keepdims=True) + eps)


class PEER(nnx.Module):
  """PEER channel mixer: `__call__(x_BTD) -> y_BTD`; sows `Stat`s expert_usage, usage_entropy and
  usage_unevenness (PEER Table 2) under `nnx.capture`."""

  def __init__(self, cfg: PEERConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, n, dk, big_n = cfg.d_model, cfg.num_heads, cfg.num_subkeys, cfg.dk, cfg.num_experts
    normal = nnx.initializers.normal
    self.w_query = nnx.Param(nnx.with_partitioning(normal(d ** -0.5), ("embed", "heads", "kv"))(
        rngs.params(), (d, h, dk)))
    key_shape = (2, n, dk // 2) if cfg.shared_subkeys else (h, 2, n, dk // 2)
    key_axes = (None, None, "kv") if cfg.shared_subkeys else ("heads", None, None, "kv")
    self.sub_keys = nnx.Param(nnx.with_partitioning(normal((dk // 2) ** -0.5), key_axes)(
        rngs.params(), key_shape))
    v_std = cfg.value_init_std if cfg.value_init_std is not None else peer_value_std(cfg)
    self.down = nnx.Param(nnx.with_partitioning(normal(d ** -0.5), ("experts", "embed"))(
        rngs.params(), (big_n, d)))
    self.up = nnx.Param(nnx.with_partitioning(normal(v_std), ("experts", "embed"))(
        rngs.params(), (big_n, d)))

  def route(self, x_BTD):
    """Per-head exact product-key top-k: (scores, indices, gates), each [B, T, h, k]."""
    cfg = self.cfg
    dt = x_BTD.dtype
    rdt = jnp.promote_types(dt, jnp.float32)
    q = jnp.einsum("btd,dhk->bthk", x_BTD, self.w_query[...].astype(dt)).astype(rdt)
    half = cfg.dk // 2
    q_a = normalize_query(q[..., :half], cfg.query_norm)
    q_b = normalize_query(q[..., half:], cfg.query_norm)
    keys = self.sub_keys[...].astype(rdt)
    if cfg.shared_subkeys:
      scores, idx = routing.product_key_topk(q_a, q_b, keys[0], keys[1], cfg.top_k)
    else:
      scores, idx = jax.vmap(routing.product_key_topk, in_axes=(-2, -2, 0, 0, None), out_axes=-2)(
          q_a, q_b, keys[:, 0], keys[:, 1], cfg.top_k)
    return scores, idx, jax.nn.softmax(scores, axis=-1)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    _, idx_BThk, g_BThk = self.route(x_BTD)
    j = cfg.num_heads * cfg.top_k
    y = expert_mlp(x_BTD, self.down[...], self.up[...], idx_BThk.reshape(b, t, j),
                   g_BThk.reshape(b, t, j).astype(x_BTD.dtype), activation=cfg.activation,
                   chunk_size=cfg.chunk_size, implementation=cfg.implementation)
    stats = routing.usage_stats(idx_BThk, g_BThk, cfg.num_experts)
    base.sow(self, base.Stat, "expert_usage", stats["usage"])
    base.sow(self, base.Stat, "usage_entropy", stats["entropy"])
    base.sow(self, base.Stat, "usage_unevenness", stats["unevenness"])
    return y
