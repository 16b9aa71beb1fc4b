"""UltraMemV2 (Huang et al. 2025, "UltraMemV2: Memory Networks Scaling to 120B Parameters with Superior
Long-Context Learning", arXiv:2508.18756 section 3.2; docs/architectures/ultramem.md).

A memory layer beside the SwiGLU FFN of every block: y = FFN(x_hat) + Mem(x_hat), x_hat the block's
normalised FFN input. The memory layer, for one head:

  1. Per Tucker rank rho: q_row^rho = LN(W_row^rho x_hat), q_col^rho = LN(W_col^rho x_hat); keys are
     LayerNorm'ed too. S_row[rho, a] = q_row^rho . K_row^rho[a], likewise S_col.
  2. TDQKR (Eq. 10-11): the n row keys and n column keys split into g groups each; cell (a, b) of the
     n x n grid scores s(a, b) = S_row[:, a]^T C^{grp(a), grp(b)} S_col[:, b] with its group pair's
     core C in R^{r x r}; one TopM runs over the union of the g^2 grids. Raw scores, no softmax [U].
  3. Pre-scores p_j = (W_p x_hat) . P[idx_j] with no activation (Eq. 15); the output is
     o = W_o sum_j s_j p_j V[idx_j] (Eq. 16) with one W_o: a single linear value expansion.

Steps 3's reads go through `pallas_kernels.expert_gather.expert_mlp` (activation "identity").

Retrieval (UltraMem v1's approximate TDQKR): for each grid, rows are prefiltered by their projection on
the top left singular vector of the grid's core, columns by the right one, keeping `prefilter` of each
(the paper caps both lists at 128); the kept m x m sub-grid is scored exactly. With
`prefilter >= n / g` retrieval is exact. Choices marked [ours]:
  - Groups partition the n keys of each side (grid (i, j) covers rows of group i and columns of group
    j), so the union of the g^2 grids is the full n x n table and no physical permutation is needed.
  - The prefilter ranks by |projection|: the singular vectors' sign is arbitrary and two large negative
    projections make a large positive cell score.
  - Cores start at the identity; one memory head (the paper: one head with doubled D_k and TopM beats
    two).
  - Initialisation (Appendix A): linear layers std sqrt(2 / (5 d)); the query-norm gain is set by Monte
    Carlo so the mean selected score is 1; the value std sigma_V (shared by P and V) is calibrated
    numerically so the memory output variance at init equals the FFN's (the paper's closed form has a
    sigma_V^2 / sigma_V^4 slip [U]); both values are kept in `self.calibration` and logged.
  - Memory/FFN compute split: `memory_compute_share(cfg)` gives the memory's share of the layer's
    FLOPs (the paper finds ~17% best); `ffn_hidden_for_share` sizes the FFN for a target share.
  - Tables are read in float32 and the rows cast to the activation dtype; TDQKR runs in float32.

The SwiGLU FFN is `layers.mlp.SwiGLU`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import base, routing
from layers.mlp import SwiGLU, SwiGLUConfig
from pallas_kernels._dispatch import check_implementation
from pallas_kernels.expert_gather import expert_mlp
from pallas_kernels.expert_gather.xla import DEFAULT_CHUNK


@dataclasses.dataclass(frozen=True)
class UltraMemConfig:
  d_model: int
  ffn_hidden: int | None = None       # SwiGLU width (None: layers.mlp's default 8/3 d)
  num_subkeys: int = 64               # n keys per side; N = n^2 table rows
  num_core_groups: int = 2            # g key groups per side, g^2 Tucker cores (paper script: 2)
  rank: int = 2                       # r, Tucker rank
  d_key: int | None = None            # D_k per rank and side; default d / 2
  top_m: int = 32                     # TopM rows read per token
  prefilter: int = 128                # rows (and columns) kept per grid before exact scoring
  d_pre: int | None = None            # D_p; default d / 4 (227M/1.2B model)
  d_value: int | None = None          # D_v; default d / 4
  query_gain: float | None = None     # None: Monte-Carlo calibrated (mean selected score = 1)
  value_init_std: float | None = None  # None: calibrated (memory output var = FFN output var)
  calib_tokens: int = 2048
  chunk_size: int = DEFAULT_CHUNK
  implementation: str | None = None

  @property
  def num_rows(self) -> int:
    return self.num_subkeys ** 2

  @property
  def dk(self) -> int:
    return self.d_key or max(1, self.d_model // 2)

  @property
  def dp(self) -> int:
    return self.d_pre or max(1, self.d_model // 4)

  @property
  def dv(self) -> int:
    return self.d_value or max(1, self.d_model // 4)

  @property
  def group_size(self) -> int:
    return self.num_subkeys // self.num_core_groups

  @property
  def kept(self) -> int:
    return min(self.prefilter, self.group_size)

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "ultramem"))
    if self.num_subkeys % self.num_core_groups:
      raise ValueError(f"ultramem: num_subkeys={self.num_subkeys} must be divisible by "
                       f"num_core_groups={self.num_core_groups}")
    cands = self.num_core_groups ** 2 * self.kept ** 2
    if not 1 <= self.top_m <= cands:
      raise ValueError(f"ultramem: top_m={self.top_m} must be in [1, g^2 * prefilter^2 = {cands}]; "
                       "raise prefilter or lower top_m")


def ffn_hidden_default(d_model: int) -> int:
  return int(8 * ((8 * d_model / 3 + 7) // 8))


def memory_flops_per_token(cfg: UltraMemConfig) -> int:
  """Multiply-adds x 2 of the memory layer: queries, key scores, grid scoring, reads, projections."""
  d, r, n, g, m = cfg.d_model, cfg.rank, cfg.num_subkeys, cfg.num_core_groups, cfg.kept
  query = 2 * d * 2 * r * cfg.dk
  keys = 2 * 2 * r * n * cfg.dk
  grid = 2 * g * g * m * m * (r * r + r)
  reads = 2 * cfg.top_m * (cfg.dp + cfg.dv)
  proj = 2 * d * cfg.dp + 2 * cfg.dv * d
  return query + keys + grid + reads + proj


def ffn_flops_per_token(d_model: int, hidden: int) -> int:
  return 6 * d_model * hidden


def memory_compute_share(cfg: UltraMemConfig) -> float:
  """Memory FLOPs / (memory + FFN FLOPs) per token (the paper sweeps 12-27.5%, ~17% best)."""
  mem = memory_flops_per_token(cfg)
  return mem / (mem + ffn_flops_per_token(cfg.d_model, cfg.ffn_hidden or
                                          ffn_hidden_default(cfg.d_model)))


def ffn_hidden_for_share(cfg: UltraMemConfig, share: float = 0.17, multiple: int = 8) -> int:
  """The SwiGLU width that puts the memory at `share` of the layer's FLOPs (rounded to `multiple`)."""
  mem = memory_flops_per_token(cfg)
  hidden = mem * (1 - share) / share / (6 * cfg.d_model)
  return max(multiple, int(round(hidden / multiple)) * multiple)


def _layernorm(x, eps=1e-6):
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def tdqkr(x_TD, p: dict, cfg: UltraMemConfig):
  """Tucker-decomposed query-key retrieval (Eq. 10-11): (scores [T, M], indices [T, M] int32).

  p holds w_row, w_col [r, D, D_k], q_scale [2, r, D_k], keys [2, r, n, D_k], cores [g, g, r, r].
  """
  g, ng, m, n = cfg.num_core_groups, cfg.group_size, cfg.kept, cfg.num_subkeys
  rdt = jnp.promote_types(x_TD.dtype, jnp.float32)
  x = x_TD.astype(rdt)
  q_row = _layernorm(jnp.einsum("td,rdk->trk", x, p["w_row"].astype(rdt))) * p["q_scale"][0]
  q_col = _layernorm(jnp.einsum("td,rdk->trk", x, p["w_col"].astype(rdt))) * p["q_scale"][1]
  keys = _layernorm(p["keys"].astype(rdt))
  s_row = jnp.einsum("trk,rnk->trn", q_row, keys[0]).reshape(-1, cfg.rank, g, ng)
  s_col = jnp.einsum("trk,rnk->trn", q_col, keys[1]).reshape(-1, cfg.rank, g, ng)
  cores = p["cores"].astype(rdt)
  # Prefilter with each core's principal singular pair (UltraMem v1); selection only, no gradient.
  u, _, vt = jnp.linalg.svd(jax.lax.stop_gradient(cores))
  u1, v1 = u[..., :, 0], vt[..., 0, :]                                  # [g, g, r]
  sr, sc = jax.lax.stop_gradient(s_row), jax.lax.stop_gradient(s_col)
  prox_row = jnp.abs(jnp.einsum("ijr,tria->tija", u1, sr))              # [T, g, g, ng]
  prox_col = jnp.abs(jnp.einsum("ijs,tsjb->tijb", v1, sc))
  _, rows = jax.lax.top_k(prox_row, m)                                  # [T, g, g, m] in-group
  _, cols = jax.lax.top_k(prox_col, m)
  t = x.shape[0]
  s_row_g = jnp.broadcast_to(jnp.moveaxis(s_row, 2, 1)[:, :, None], (t, g, g, cfg.rank, ng))
  s_col_g = jnp.broadcast_to(jnp.moveaxis(s_col, 2, 1)[:, None], (t, g, g, cfg.rank, ng))
  sel_row = jnp.take_along_axis(s_row_g, rows[:, :, :, None, :], axis=-1)   # [T, g, g, r, m]
  sel_col = jnp.take_along_axis(s_col_g, cols[:, :, :, None, :], axis=-1)
  grid = jnp.einsum("tijra,ijrs,tijsb->tijab", sel_row, cores, sel_col)     # [T, g, g, m, m]
  gi = jnp.arange(g)
  row_glob = gi[None, :, None, None] * ng + rows
  col_glob = gi[None, None, :, None] * ng + cols
  idx = row_glob[..., :, None] * n + col_glob[..., None, :]
  scores, pos = routing.topk(grid.reshape(t, -1), cfg.top_m)
  return scores, jnp.take_along_axis(idx.reshape(t, -1), pos, axis=-1).astype(jnp.int32)


def memory_forward(x_TD, p: dict, cfg: UltraMemConfig):
  """o = W_o sum_j s_j ((W_p x) . P[idx_j]) V[idx_j] (Eq. 15-16); returns (o [T, D], scores, idx)."""
  dt = x_TD.dtype
  scores, idx = tdqkr(x_TD, p, cfg)
  pre = x_TD @ p["w_pre"].astype(dt)
  o_v = expert_mlp(pre, p["pre_values"], p["values"], idx, scores.astype(dt), activation="identity",
                   chunk_size=cfg.chunk_size, implementation=cfg.implementation)
  return o_v @ p["w_out"].astype(dt), scores, idx


@functools.partial(jax.jit, static_argnums=(0, 1))
def _calibrate(cfg: UltraMemConfig, ffn_graph, ffn_state, x_cal, p):
  """(query gain, value std) of Appendix A, measured on x_cal with unit-std P and V."""
  gain = jnp.float32(cfg.query_gain) if cfg.query_gain is not None else None
  if gain is None:
    mean_score = jnp.mean(tdqkr(x_cal, p, cfg)[0])
    # Grid scores are bilinear in the row and column queries: one gain on both scales them by gain^2.
    gain = jax.lax.rsqrt(jnp.maximum(jnp.abs(mean_score), 1e-6))
  p = dict(p, q_scale=p["q_scale"] * gain)
  if cfg.value_init_std is not None:
    return gain, jnp.float32(cfg.value_init_std)
  # The memory output is bilinear in (P, V), so its variance scales as sigma_V^4.
  var_mem = jnp.var(memory_forward(x_cal, p, cfg)[0])
  var_ffn = jnp.var(nnx.merge(ffn_graph, ffn_state)(x_cal))
  return gain, (var_ffn / jnp.maximum(var_mem, 1e-30)) ** 0.25


def _param(value, names, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A Param (`kind`) holding a computed (calibrated) value, with logical axes like
  `nnx.with_partitioning`."""
  return kind(nnx.with_partitioning(lambda *_: value, names)(None))


class UltraMem(nnx.Module):
  """UltraMemV2 block channel mixer: `__call__(x_BTD) -> FFN(x) + Mem(x)`. Sows `Stat`s
  memory_usage, memory_unevenness and mean_top1_score under `nnx.capture`."""

  def __init__(self, cfg: UltraMemConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, r, n, g = cfg.d_model, cfg.rank, cfg.num_subkeys, cfg.num_core_groups
    lin = nnx.initializers.normal(math.sqrt(2 / (5 * d)))
    part = nnx.with_partitioning
    self.ffn = SwiGLU(SwiGLUConfig(d, cfg.ffn_hidden), rngs=rngs)
    self.w_row = nnx.Param(part(lin, (None, "embed", "kv"))(rngs.params(), (r, d, cfg.dk)))
    self.w_col = nnx.Param(part(lin, (None, "embed", "kv"))(rngs.params(), (r, d, cfg.dk)))
    self.keys = nnx.Param(part(nnx.initializers.normal(1.0), (None, None, None, "kv"))(
        rngs.params(), (2, r, n, cfg.dk)))
    self.cores = nnx.Param(part(lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(
        jnp.eye(r, dtype=dtype), shape), (None, None, None, None))(rngs.params(), (g, g, r, r)))
    self.w_pre = nnx.Param(part(lin, ("embed", "mlp"))(rngs.params(), (d, cfg.dp)))
    self.w_out = nnx.Param(part(lin, ("mlp", "embed"))(rngs.params(), (cfg.dv, d)))
    pre_values = jax.random.normal(rngs.params(), (cfg.num_rows, cfg.dp), jnp.float32)
    values = jax.random.normal(rngs.params(), (cfg.num_rows, cfg.dv), jnp.float32)
    q_scale = jnp.ones((2, r, cfg.dk), jnp.float32)

    # Appendix A calibration on unit-variance tokens (the block's normalised FFN input).
    x_cal = jax.random.normal(rngs.params(), (cfg.calib_tokens, d), jnp.float32)
    ffn_graph, ffn_state = nnx.split(self.ffn)
    gain, v_std = _calibrate(cfg, ffn_graph, ffn_state, x_cal,
                             self._arrays(q_scale, pre_values, values))
    q_scale = q_scale * gain
    self.q_scale = _param(q_scale, (None, None, "kv"), base.Gain)  # scales LN'd queries
    self.pre_values = _param(pre_values * v_std, ("experts", None))
    self.values = _param(values * v_std, ("experts", None))
    self.calibration = None
    if not isinstance(gain, jax.core.Tracer) and not isinstance(v_std, jax.core.Tracer):
      self.calibration = {"query_gain": float(gain), "value_std": float(v_std)}
      logging.info("UltraMem init: query gain %.4g, value std %.4g, memory compute share %.3f",
                   float(gain), float(v_std), memory_compute_share(cfg))

  def _arrays(self, q_scale=None, pre_values=None, values=None) -> dict:
    get = lambda name, override: override if override is not None else getattr(self, name)[...]
    return {"w_row": self.w_row[...], "w_col": self.w_col[...], "keys": self.keys[...],
            "cores": self.cores[...], "w_pre": self.w_pre[...], "w_out": self.w_out[...],
            "q_scale": get("q_scale", q_scale), "pre_values": get("pre_values", pre_values),
            "values": get("values", values)}

  def memory(self, x_BTD):
    """The memory branch alone: (o [B, T, D], scores [B, T, M], indices [B, T, M])."""
    b, t, d = x_BTD.shape
    o, s, idx = memory_forward(x_BTD.reshape(b * t, d), self._arrays(), self.cfg)
    return o.reshape(b, t, d), s.reshape(b, t, -1), idx.reshape(b, t, -1)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    o, scores, idx = self.memory(x_BTD)
    stats = routing.usage_stats(idx, jnp.abs(scores), self.cfg.num_rows)
    base.sow(self, base.Stat, "memory_usage", stats["usage"])
    base.sow(self, base.Stat, "memory_unevenness", stats["unevenness"])
    base.sow(self, base.Stat, "mean_top1_score", jnp.mean(jax.lax.stop_gradient(scores[..., 0])))
    return self.ffn(x_BTD) + o
