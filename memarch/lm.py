"""The language-model shell every architecture plugs into (docs/design.md, "The LM shell").

tokens -> embedding -> N pre-norm residual blocks -> final RMSNorm -> head (tied or untied).
Block i: x += mixer_i(RMSNorm(x)); x += channel_i(RMSNorm(x)), where mixer_i and channel_i are picked
by cycling `layer_pattern` and `channel_pattern`, so hybrids (memory layers interleaved with
attention) are one config line. `__call__` threads every layer's recurrent state.

Layers are an `nnx.List` of per-block parameters, applied in a Python loop: patterns may mix
different mixer classes, which one stacked module cannot hold. `scan_layers=True` instead runs a
`lax.scan` over whole pattern periods (identical structure), stacking their parameters at call
time, so deep models compile one period rather than every block (`LM._scan_blocks`).

Precision and memory at scale (docs/design.md, "Precision and memory at scale"): `param_dtype`
stores every parameter in float32 or bfloat16 (bf16 parameters are the weights themselves, updated
by an optimizer whose state stays float32: memarch.optim); `remat` recomputes each block's
activations in the backward pass instead of storing them: 'dots' keeps the matmul outputs, 'full'
keeps only the block's input.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.norms import RMSNorm
from memarch import registry

PARAM_DTYPES = ("float32", "bfloat16")

# model.remat -> the jax.checkpoint policy of each block (None: no remat). 'dots' saves the outputs
# of matmuls without batch dimensions (the projections; not the attention scores, which are
# batched over heads and grow as T^2), so the backward recomputes only the cheap elementwise work;
# 'full' saves nothing inside the block and reruns its whole forward.
REMAT = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


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
  dtype: str = "float32"  # compute dtype (activations)
  param_dtype: str = "float32"  # storage dtype of every parameter: float32 | bfloat16
  remat: str = "none"  # none | dots | full: what each block keeps for its backward pass (REMAT)
  scan_layers: bool = False  # run the blocks as a lax.scan over pattern periods (LM._scan_blocks)

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
    if self.param_dtype not in PARAM_DTYPES:
      raise ValueError(f"model.param_dtype must be {' or '.join(PARAM_DTYPES)}, "
                       f"got {self.param_dtype!r}")
    if self.remat not in REMAT:
      raise ValueError(f"model.remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
    if self.scan_layers and self.num_layers % self.period:
      raise ValueError(f"model.scan_layers needs model.num_layers={self.num_layers} to be a "
                       f"multiple of the layer pattern's period {self.period}; change either")

  @property
  def period(self) -> int:
    """Blocks after which layer_pattern and channel_pattern both repeat."""
    return math.lcm(len(self.layer_pattern), len(self.channel_pattern) or 1)

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
    if cfg.param_dtype != "float32":
      # Initialised in float32 (same draws as a float32 model), then stored in param_dtype.
      params = nnx.state(self, nnx.Param)
      nnx.update(self, jax.tree.map(lambda p: p.astype(cfg.param_dtype), params))

  def init_state(self, batch_size: int, *, max_len: int | None = None, dtype=jnp.float32):
    return [blk.mixer.init_state(batch_size, max_len=max_len, dtype=dtype) for blk in self.blocks]

  def __call__(self, tokens_BT, *, state=None, segment_ids_BT=None):
    """Returns (logits_BTV float32, per-layer states)."""
    dt = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
    if self.cfg.scan_layers:
      x, states = self._scan_blocks(x, state, segment_ids_BT)
    else:
      x, states = run_blocks(self.blocks, x, state, segment_ids_BT, block_call(self.cfg.remat))
    x = self.final_norm(x)
    if self.head is None:
      w = self.embed[...].astype(dt).T * (self.cfg.d_model ** -0.5)
    else:
      w = self.head[...].astype(dt)
    logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
    return logits, states

  def _scan_blocks(self, x_BTD, state, segment_ids_BT):
    """The blocks as one `lax.scan` over G groups of one pattern period P (model.scan_layers), so
    XLA compiles one period instead of num_layers blocks.

    The parameters stay per block (init, checkpoints, optimizer state and sharding are those of the
    loop) and are stacked to [G, ...] here, at the cost of one copy of the block parameters per
    call [ours]. Values sown inside the scan come out as its outputs and are written to the block
    that made them (`Transformed`), so the training step sees the loop's values and names.
    """
    p, g_count = self.cfg.period, len(self.blocks) // self.cfg.period
    groups = [nnx.List(self.blocks[g * p:(g + 1) * p]) for g in range(g_count)]
    split = [Transformed.split(group, capturing=self) for group in groups]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    group_state_G = stack([t.state for t in split])
    state_G = None if state is None else [stack(state[j::p]) for j in range(p)]
    period = functools.partial(run_blocks, segment_ids_BT=segment_ids_BT,
                               call=block_call(self.cfg.remat))

    def body(x, inputs):
      group_state, layer_states = inputs
      (x, out), sown = split[0].call(period, group_state, x, layer_states)
      return x, (out, sown)

    x_BTD, (states_G, sown_G) = jax.lax.scan(body, x_BTD, (group_state_G, state_G))
    at = lambda tree, g: jax.tree.map(lambda a: a[g], tree)
    for g, group in enumerate(groups):
      Transformed.write_sown(group, at(sown_G, g))
    return x_BTD, [at(states_G[j], g) for g in range(g_count) for j in range(p)]


class Transformed(NamedTuple):
  """A module split for a JAX transform (jax.checkpoint, lax.scan) inside which it may sow.

  Under `nnx.capture` every module holds capture slots, and an `nnx.List` then mixes int and str
  keys, which Flax 0.12 cannot split or merge. So `split` lifts the slots off while it splits, the
  merged copy runs under its own `nnx.capture` of the same types, what it sowed leaves the
  transform as arrays, and `write_sown` sows it again on the real modules.
  """
  graphdef: Any
  state: Any  # nnx.State of the module (no capture slots): the transform's input
  sown_types: tuple  # the Intermediate types the enclosing nnx.capture collects; () if none

  @classmethod
  def split(cls, module: nnx.Module, capturing: nnx.Module | None = None) -> Transformed:
    """`capturing`: the module whose capture slots name the sown types (default `module`)."""
    types = tuple(type(v) for v in getattr(capturing or module, "__captures__", ()))
    slots = {}
    for path, m in nnx.iter_modules(module):
      if hasattr(m, "__captures__"):
        slots[path] = m.__captures__
        delattr(m, "__captures__")
    try:
      graphdef, state = nnx.split(module)
    finally:
      for path, m in nnx.iter_modules(module):
        if path in slots:
          m.__captures__ = nnx.data(slots[path])
    return cls(graphdef, state, types)

  def call(self, fn, state, *args):
    """(fn(merged module, *args), what it sowed: one nnx.State per sown type)."""
    module = nnx.merge(self.graphdef, state)
    if not self.sown_types:
      return fn(module, *args), []
    out, *sown = nnx.capture(fn, *self.sown_types)(module, *args)
    return out, sown

  @staticmethod
  def write_sown(module: nnx.Module, sown: list) -> None:
    for state in sown:
      for path, var in nnx.to_flat_state(state):
        *module_path, name = path
        m = module
        for key in module_path:
          m = m[key] if isinstance(key, int) else getattr(m, key)
        for value in var.get_value():
          m.sow(type(var), name, value)


def run_blocks(blocks, x_BTD, states, segment_ids_BT, call):
  """x through `blocks` in order with `call` (block_call); returns (x_BTD, per-block states).
  `states` None starts every block fresh. The loop form runs all blocks, the scanned form one
  pattern period per scan step."""
  out = []
  for i, blk in enumerate(blocks):
    x_BTD, s = call(blk, x_BTD, None if states is None else states[i], segment_ids_BT)
    out.append(s)
  return x_BTD, out


def _apply_block(block: Block, x_BTD, state, segment_ids_BT):
  return block(x_BTD, state=state, segment_ids_BT=segment_ids_BT)


def block_call(remat: str):
  """fn(block, x_BTD, state, segment_ids_BT) -> (x_BTD, state): the block, rematerialised with the
  model.remat policy unless 'none'.

  The remat is `jax.checkpoint` over the block's split state (`Transformed`) rather than
  `nnx.remat`, whose flattening of a block holding an `nnx.List` (Titans' W_0 per memory layer)
  fails under `nnx.capture` in Flax 0.12.
  """
  policy = REMAT[remat]
  if policy is None:
    return _apply_block

  def call(block: Block, x_BTD, state, segment_ids_BT):
    t = Transformed.split(block)
    pure = jax.checkpoint(functools.partial(t.call, _apply_block), policy=policy)
    out, sown = pure(t.state, x_BTD, state, segment_ids_BT)
    t.write_sown(block, sown)
    return out

  return call


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
