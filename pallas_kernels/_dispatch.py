"""Implementation names and dispatch shared by every kernel op (docs/design.md).

Every op (gated_delta_rule, linear_attention, expert_gather, expert_mlp, block_retrieval_attention,
titans_memory, miras_memory) registers its implementations by `Implementation` name and calls
`dispatch`, which resolves the caller's choice with `resolve`:

- `implementation=None`: the best available path for the default backend (`default_order`), falling
  back to `xla` when a Pallas path raises `NotImplementedError` (unsupported shape/dtype) or the
  backend has none. An op may name Pallas paths that `None` skips (`opt_in`: a kernel that has no
  device timing yet runs only when asked for).
- an explicit name is honoured or fails loudly; `interpret=True` runs a Pallas path in interpret
  mode (how the CPU test suite exercises every kernel).

Pallas modules are imported on first use (`lazy`), so importing an op never imports a Pallas
lowering it does not run. Layer configs hold `None` or one of the names (`check_implementation`).
"""
from __future__ import annotations

import enum
import importlib
from typing import Callable

import jax


class Implementation(enum.StrEnum):
  """The implementation names every op understands (a plain str compares equal to its member)."""
  REFERENCE = "reference"    # the oracle: a token loop, obviously correct, slow
  XLA = "xla"                # chunked plain JAX: the portable default
  PALLAS_GPU = "pallas_gpu"  # Pallas with the Triton lowering
  PALLAS_TPU = "pallas_tpu"  # Pallas with the Mosaic lowering


IMPLEMENTATIONS = tuple(i.value for i in Implementation)


def check_implementation(implementation, where: str) -> str | None:
  """None (best available) or a known name -> that name as a plain str, or None; a one-line
  ValueError naming `where` (e.g. a layer config) otherwise."""
  if implementation is None:
    return None
  if isinstance(implementation, str) and implementation in IMPLEMENTATIONS:
    return Implementation(implementation).value
  raise ValueError(f"{where}: unknown implementation {implementation!r}; choose one of "
                   f"{IMPLEMENTATIONS} or None (best available)")


def default_order(backend: str | None = None) -> tuple[str, ...]:
  """Preferred implementation order on a backend when the caller leaves it to us."""
  backend = backend or jax.default_backend()
  if backend == "gpu":
    return (Implementation.PALLAS_GPU.value, Implementation.XLA.value)
  if backend == "tpu":
    return (Implementation.PALLAS_TPU.value, Implementation.XLA.value)
  return (Implementation.XLA.value,)


def lazy(module: str, name: str) -> Callable:
  """`module.name`, imported on the first call (how every op registers its Pallas paths)."""
  def call(*args, **kwargs):
    return getattr(importlib.import_module(module), name)(*args, **kwargs)
  call.__name__ = call.__qualname__ = name
  return call


def resolve(op_name: str, impls: dict[str, Callable], implementation: str | None,
            opt_in: tuple[str, ...] = ()) -> tuple[str, ...]:
  """The implementations to try, in order: the explicit one alone (checked), or for None the
  backend's preference order restricted to what the op has, minus `opt_in`, ending with xla."""
  name = check_implementation(implementation, op_name)
  if name is not None:
    if name not in impls:
      raise NotImplementedError(f"{op_name}: implementation {name!r} is not available "
                                f"(available: {tuple(impls)})")
    return (name,)
  order = [n for n in default_order() if n in impls and n not in opt_in]
  return tuple(order) + (() if Implementation.XLA.value in order else (Implementation.XLA.value,))


def dispatch(op_name: str, impls: dict[str, Callable], implementation: str | None,
             interpret: bool, *args, opt_in: tuple[str, ...] = (), **kwargs):
  """Runs `impls[name]` on args/kwargs for the first resolved name that does not raise
  NotImplementedError (an explicit choice is never skipped). Pallas implementations receive
  `interpret=` as a keyword; `reference` and `xla` do not."""
  names = resolve(op_name, impls, implementation, opt_in)
  for i, name in enumerate(names):
    if not name.startswith("pallas"):
      return impls[name](*args, **kwargs)
    try:
      return impls[name](*args, interpret=interpret, **kwargs)
    except NotImplementedError:
      if implementation is not None or i == len(names) - 1:
        raise
  raise AssertionError("unreachable: resolve always ends with a non-Pallas path")
