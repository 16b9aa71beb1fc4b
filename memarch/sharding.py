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


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
  """(start, stop): the rows of a [batch_size, ...] batch that live on this process's devices
  under `batch_sharding`; the process loads only these (all rows with one process)."""
  index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
  held = set()
  for (rows,) in index_map.values():
    held.update(range(*rows.indices(batch_size)))
  start, stop = min(held), max(held) + 1
  if len(held) != stop - start:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(held)} of the batch, not one "
                     "contiguous range; order the mesh devices by process (the default)")
  return start, stop


def global_batch(mesh: jax.sharding.Mesh, local: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, jax.Array]:
  """This process's rows (`process_rows`) of each batch array -> global arrays sharded over the
  batch axis (with one process: a plain sharded `device_put`)."""
  return {k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.ndim), np.asarray(v), (batch_size, *v.shape[1:]))
      for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def maybe_initialize_distributed(mesh_cfg) -> None:
  """Multi-host start (mesh.distributed=True), once per process. With mesh.coordinator_address
  empty, `jax.distributed.initialize()` finds the coordinator itself (Cloud TPU, SLURM, Open MPI,
  or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables);
  otherwise the address, mesh.num_processes and mesh.process_id are passed as given."""
  address = mesh_cfg.get("coordinator_address", "")
  if not mesh_cfg.distributed:
    if address:
      raise ValueError(f"mesh.coordinator_address={address!r} is set but mesh.distributed=False; "
                       "add --config.mesh.distributed=True (or drop the address)")
    return
  if jax.distributed.is_initialized():
    return
  if not address:
    jax.distributed.initialize()
    return
  num, pid = int(mesh_cfg.get("num_processes", 0)), int(mesh_cfg.get("process_id", -1))
  if num < 1 or not 0 <= pid < num:
    raise ValueError(f"mesh.coordinator_address={address!r} needs mesh.num_processes >= 1 and "
                     f"0 <= mesh.process_id < num_processes (got {num} and {pid})")
  jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def describe(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({np.prod(list(mesh.shape.values()))} devices)"
