"""The language-model shell every architecture plugs into (docs/design.md, "The LM shell").

tokens -> embedding -> N pre-norm residual blocks -> final RMSNorm -> head (tied or untied).
Block i: x += mixer_i(RMSNorm(x)); x += channel_i(RMSNorm(x)), where mixer_i and channel_i are picked
by cycling `layer_pattern` and `channel_pattern`, so hybrids (memory layers interleaved with
attention) are one config line. `__call__` threads every layer's recurrent state.

Layers are an `nnx.List` applied in a Python loop rather than a stacked `nnx.scan`: patterns may mix
different mixer classes, which a stacked scan cannot hold, and the zoo's models are shallow.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from layers.norms import RMSNorm
from memarch import registry


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  layer_pattern: tuple[str, ...] = ("attention",)
  mixer_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  channel_pattern: tuple[str, ...] = ("swiglu",)
  channel_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def __post_init__(self):
    for name, value in (("vocab_size", self.vocab_size), ("d_model", self.d_model),
                        ("num_layers", self.num_layers), ("num_heads", self.num_heads)):
      if value < 1:
        raise ValueError(f"model.{name} must be >= 1, got {value}")
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                       f"{self.num_heads}; pick num_heads dividing d_model")
    if not self.layer_pattern:
      raise ValueError("model.layer_pattern is empty; name at least one sequence mixer")
    for name in self.layer_pattern:
      registry.check_name("sequence mixer", name)
    for name in self.channel_pattern:
      registry.check_name("channel mixer", name)
    if self.dtype not in ("float32", "bfloat16", "float64"):
      raise ValueError(f"model.dtype must be float32, bfloat16 or float64, got {self.dtype!r}")

  def mixer_name(self, layer: int) -> str:
    return self.layer_pattern[layer % len(self.layer_pattern)]

  def channel_name(self, layer: int) -> str:
    return self.channel_pattern[layer % len(self.channel_pattern)] if self.channel_pattern else "none"


class Block(nnx.Module):

  def __init__(self, cfg: LMConfig, layer: int, *, rngs: nnx.Rngs):
    name = cfg.mixer_name(layer)
    self.mixer_norm = RMSNorm(cfg.d_model)
    self.mixer = registry.build_mixer(name, rngs=rngs, d_model=cfg.d_model,
                                      num_heads=cfg.num_heads, **cfg.mixer_kwargs.get(name, {}))
    cname = cfg.channel_name(layer)
    if cname == "none":
      self.channel_norm = None
      self.channel = None
    else:
      self.channel_norm = RMSNorm(cfg.d_model)
      # Channel mixers get only the width: their own "heads" (e.g. PEER retrieval heads) are
      # not the attention heads.
      self.channel = registry.build_channel(cname, rngs=rngs, d_model=cfg.d_model,
                                            **cfg.channel_kwargs.get(cname, {}))

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    y, state = self.mixer(self.mixer_norm(x_BTD), state=state, segment_ids_BT=segment_ids_BT)
    x_BTD = x_BTD + y.astype(x_BTD.dtype)
    if self.channel is not None:
      x_BTD = x_BTD + self.channel(self.channel_norm(x_BTD)).astype(x_BTD.dtype)
    return x_BTD, state


class LM(nnx.Module):

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed"))(
        rngs.params(), (cfg.vocab_size, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model)
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = nnx.Param(nnx.with_partitioning(
          nnx.initializers.normal(cfg.d_model ** -0.5), ("embed", "vocab"))(
              rngs.params(), (cfg.d_model, cfg.vocab_size)))

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    return [blk.mixer.init_state(batch_size, max_len=max_len, dtype=dtype) for blk in self.blocks]

  def __call__(self, tokens_BT, *, state=None, segment_ids_BT=None):
    """Returns (logits_BTV float32, per-layer states)."""
    dt = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
    states = []
    for i, blk in enumerate(self.blocks):
      x, s = blk(x, state=None if state is None else state[i], segment_ids_BT=segment_ids_BT)
      states.append(s)
    x = self.final_norm(x)
    if self.head is None:
      w = self.embed[...].astype(dt).T * (self.cfg.d_model ** -0.5)
    else:
      w = self.head[...].astype(dt)
    logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
    return logits, states


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
