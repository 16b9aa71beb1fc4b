"""Protocols and conventions shared by every layer (docs/design.md, "Interfaces").

Sequence mixers mix tokens and may carry state:

    init_state(batch_size, *, max_len=None, dtype=jnp.float32) -> State
    __call__(x_BTD, *, state=None, segment_ids_BT=None) -> (y_BTD, State)

A `State` is a pytree (a dict of arrays) whose leaves all have the batch as their leading axis, so the
LM shell can thread, stack and shard states uniformly. `__call__` never mutates the module.

Channel mixers act per token: `__call__(x_BTD) -> y_BTD`.

Auxiliary losses and statistics are sown as `nnx.Intermediate` subclasses:
  - `AuxLoss`: scalar terms added to the training loss; their weights come from the config.
  - `Stat`: scalar statistics logged as metrics, never differentiated.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

State = Any  # a pytree of arrays with leading batch axis, or an empty dict


class AuxLoss(nnx.Intermediate):
  """A scalar auxiliary loss sown by a layer (e.g. MoM router balance)."""


class Stat(nnx.Intermediate):
  """A scalar statistic sown by a layer (e.g. memory surprise norm); logged, not trained."""


class MemoryInit(nnx.Param):
  """A learned initial memory state (e.g. Titans' W_0). Trained like any parameter but exempt from
  weight decay by default (`opt.decay_memory_init`): decay would shrink W_0, and the write gain of
  an LN'd memory grows as 1/scale(W_0)^2, so the inner step size would drift up during training."""


@runtime_checkable
class SequenceMixer(Protocol):

  def init_state(self, batch_size: int, *, max_len: int | None = None,
                 dtype=jnp.float32) -> State:
    ...

  def __call__(self, x_BTD: jax.Array, *, state: State | None = None,
               segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, State]:
    ...


@runtime_checkable
class ChannelMixer(Protocol):

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    ...


def sow(module: nnx.Module, variable_type, name: str, value) -> None:
  """`module.sow(...)` only under `nnx.capture`; a no-op otherwise.

  Plain `Module.sow` outside a capture stores the value on the module, i.e. mutates it inside
  `__call__` (deprecated in Flax and unsafe across traces), which mixers must never do.
  """
  if hasattr(module, "__captures__"):
    module.sow(variable_type, name, value)


def dense(rngs: nnx.Rngs, shape, axes, std: float | None = None) -> nnx.Param:
  """A weight of `shape` sharded over the logical `axes`: LeCun-normal, or N(0, std^2)."""
  init = nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))


class Gain(nnx.Param):
  """A per-head norm scale or bias, or a scale like Memora's c: it multiplies or shifts activations
  rather than mixing them, but its [heads, ...] shape makes the matrices-only rule decay it like a
  weight. `opt.decay_gains=False` exempts it like the 1-D norm scales (default: decayed)."""


def const(value: float, shape, axes, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A parameter (`kind`) of `shape` filled with `value`, sharded over the logical `axes`."""
  return kind(nnx.with_partitioning(nnx.initializers.constant(value), axes)(
      jax.random.PRNGKey(0), shape))
