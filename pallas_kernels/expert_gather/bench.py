"""Micro-benchmark of the PEER expert read: naive take + einsum (`reference`) vs the custom-VJP
`xla` path vs the Pallas kernel of the backend (docs/architectures/peer.md, "The expert read"),
with the achieved bandwidth against a plain device copy measured in the same run. Called by
`scripts/bench.py`; never a timed test.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.expert_gather import expert_gather, expert_mlp
from pallas_kernels.expert_gather.xla import DEFAULT_CHUNK


def _median_time(fn, args, warmup, iters):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bytes_moved(n_experts: int, d: int, T: int, k: int, op: str, itemsize: int = 4) -> int:
  """Minimal HBM traffic of one fwd+bwd expert read with the gathered rows never stored:
  every pass re-reads the T*k selected rows (forward; token backward), the table gradients read
  the T*k gathered activation rows and write the dense [N, d] gradients, plus the [T, d] token
  tensors. gather: 3 row passes over one table; mlp: 3 over two tables."""
  tables = 2 if op == "mlp" else 1
  rows = 3 * T * k * d * tables
  tokens = (4 if op == "mlp" else 2) * T * d
  return itemsize * (rows + n_experts * d * tables + tokens)


def copy_bandwidth(n_bytes: int = 1 << 30, iters: int = 5) -> float:
  """Bytes/s of a plain device copy (read + write of an n_bytes float32 array, `x + 1`)."""
  x = jnp.zeros((n_bytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x + 1.0)
  return 2 * n_bytes / _median_time(f, (x,), 2, iters)


def bench_expert_gather(n_experts: int, d: int, T: int, k: int, *, op: str = "mlp",
                        dtype=jnp.float32, chunk_size: int = DEFAULT_CHUNK, iters: int = 5,
                        warmup: int = 2, seed: int = 0, pallas: str | None = None) -> dict:
  """Forward + backward step time and compiled memory of one expert read, every path.

  Args:
    n_experts: table rows N; d: row width; T: tokens (batch x length, flattened); k: rows read per
      token (PEER: heads x top-k). op: "mlp" (PEER, two tables, GELU) or "gather" (one table).
    dtype: activation dtype (tables stay float32).
    pallas: also time this Pallas implementation ("pallas_gpu" / "pallas_tpu"; not interpreted).

  Returns:
    {"naive": {...}, "custom_vjp": {...}[, "pallas": {...}], "speedup": naive/custom step time,
     "temp_ratio": ...} where each path has step_s (median seconds of a jitted value_and_grad
    w.r.t. every float input), bytes (arguments + outputs + temporaries, XLA's `memory_analysis`),
    temp_bytes and gbps (`bytes_moved` / step_s, in GB/s).
  """
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  x = jax.random.normal(keys[0], (T, d), jnp.float32).astype(dtype)
  down = jax.random.normal(keys[1], (n_experts, d), jnp.float32) * d ** -0.5
  up = jax.random.normal(keys[2], (n_experts, d), jnp.float32)
  w = jax.nn.softmax(jax.random.normal(keys[3], (T, k), jnp.float32)).astype(dtype)
  idx = jax.random.randint(keys[4], (T, k), 0, n_experts)
  ct = jax.random.normal(keys[5], (T, d), jnp.float32).astype(dtype)

  def make_step(impl):
    def loss(x, down, up, w, idx, ct):
      if op == "mlp":
        y = expert_mlp(x, down, up, idx, w, chunk_size=chunk_size, implementation=impl)
      else:
        y = expert_gather(up, idx, w, chunk_size=chunk_size, implementation=impl)
      return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  args = (x, down, up, w, idx, ct)
  out = {}
  paths = [("naive", "reference"), ("custom_vjp", "xla")] + ([("pallas", pallas)] if pallas else [])
  moved = bytes_moved(n_experts, d, T, k, op)
  for name, impl in paths:
    step = make_step(impl)
    mem = step.lower(*args).compile().memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else -1
    total = (int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - getattr(mem, "alias_size_in_bytes", 0)) if mem is not None else -1)
    step_s = _median_time(step, args, warmup, iters)
    out[name] = {"step_s": step_s, "bytes": total, "temp_bytes": temp, "gbps": moved / step_s / 1e9}
  out["speedup"] = out["naive"]["step_s"] / out["custom_vjp"]["step_s"]
  out["temp_ratio"] = out["naive"]["temp_bytes"] / max(out["custom_vjp"]["temp_bytes"], 1)
  out["config"] = dict(n_experts=n_experts, d=d, T=T, k=k, op=op, dtype=jnp.dtype(dtype).name,
                       chunk_size=chunk_size, backend=jax.default_backend())
  return out
