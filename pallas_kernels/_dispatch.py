"""Implementation dispatch shared by every kernel op (docs/design.md).

An op module registers its implementations by name; `dispatch` picks one:

- `implementation=None`: the best available path for the default backend, falling back to `xla`
  when a Pallas path raises `NotImplementedError` (unsupported shape/dtype) or the backend has none.
- an explicit name is honoured or fails loudly; `interpret=True` runs a Pallas path in interpret mode
  (how the CPU test suite exercises every kernel).
"""
from __future__ import annotations

from typing import Callable

import jax

IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")


def default_order(backend: str | None = None) -> tuple[str, ...]:
  """Preferred implementation order on a backend when the caller leaves it to us."""
  backend = backend or jax.default_backend()
  if backend == "gpu":
    return ("pallas_gpu", "xla")
  if backend == "tpu":
    return ("pallas_tpu", "xla")
  return ("xla",)


def dispatch(op_name: str, impls: dict[str, Callable], implementation: str | None,
             interpret: bool, *args, **kwargs):
  """Runs `impls[implementation]` (or the best available one) on args/kwargs.

  Pallas implementations receive `interpret=` as a keyword; `reference` and `xla` do not.
  """
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"{op_name}: unknown implementation {implementation!r}; "
                       f"choose one of {IMPLEMENTATIONS} or None")
    if implementation not in impls:
      raise NotImplementedError(f"{op_name}: implementation {implementation!r} is not available "
                                f"(available: {tuple(impls)})")
    fn = impls[implementation]
    if implementation.startswith("pallas"):
      return fn(*args, interpret=interpret, **kwargs)
    return fn(*args, **kwargs)
  for name in default_order():
    if name not in impls:
      continue
    if name.startswith("pallas"):
      try:
        return impls[name](*args, interpret=interpret, **kwargs)
      except NotImplementedError:
        continue
    return impls[name](*args, **kwargs)
  return impls["xla"](*args, **kwargs)
