"""Device mesh and logical-axis sharding rules (docs/design.md).

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); `LOGICAL_RULES`
maps them onto the mesh axes `data`, `fsdp` and `tensor`. Modules are created inside `mesh_context`, so
eager sharding always finds a mesh; a one-device mesh is used where the caller gives none (tests,
notebooks).

Logical axis names used by the layers:
  batch   leading axis of activations and states
  embed   model width D                       vocab   vocabulary
  mlp     hidden width of MLPs / expansions   heads   attention / memory heads
  kv      per-head feature dim                experts expert tables (PEER, UltraMem)
  layers  stacked-layer axis (never sharded)
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("experts", "tensor"),
    ("layers", None),
    ("seq", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; `data=-1` takes every device not used by fsdp x tensor."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f"mesh: {n} devices are not divisible by fsdp*tensor={fsdp * tensor}; "
                       "set mesh.fsdp and mesh.tensor to divisors of the device count")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f"mesh: data*fsdp*tensor = {data}*{fsdp}*{tensor} != {n} devices; "
                     "set mesh.data=-1 to use the remaining devices")
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def single_device_mesh() -> jax.sharding.Mesh:
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None = None,
                 rules=LOGICAL_RULES) -> Iterator[jax.sharding.Mesh]:
  """Sets `mesh` (default: one device) and the logical-axis rules for module creation and steps."""
  mesh = single_device_mesh() if mesh is None else mesh
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield mesh


def logical_to_mesh_spec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
  table = dict(rules)
  return P(*[table.get(n) if n is not None else None for n in names])


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Shards the leading (batch) axis over data and fsdp."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-host start: `jax.distributed.initialize()` reads the coordinator from the environment."""
  if enabled:
    jax.distributed.initialize()


def describe(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({np.prod(list(mesh.shape.values()))} devices)"
