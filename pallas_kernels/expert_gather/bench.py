"""Micro-benchmark of the PEER expert read: custom-VJP `xla` path vs naive take + einsum
(reference/peer_ultramem.md sections 5.2-5.3, 5.8). Called by `scripts/bench.py`; never a timed test.
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


def bench_expert_gather(n_experts: int, d: int, T: int, k: int, *, op: str = "mlp",
                        dtype=jnp.float32, chunk_size: int = DEFAULT_CHUNK, iters: int = 5,
                        warmup: int = 2, seed: int = 0) -> dict:
  """Forward + backward step time and compiled memory of one expert read, both paths.

  Args:
    n_experts: table rows N; d: row width; T: tokens (batch x length, flattened); k: rows read per
      token (PEER: heads x top-k). op: "mlp" (PEER, two tables, GELU) or "gather" (one table).
    dtype: activation dtype (tables stay float32).

  Returns:
    {"naive": {...}, "custom_vjp": {...}, "speedup": naive/custom step time, "temp_ratio": ...}
    where each path has step_s (median seconds of a jitted value_and_grad w.r.t. every float input),
    bytes (arguments + outputs + temporaries, XLA's `memory_analysis`) and temp_bytes.
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
  for name, impl in (("naive", "reference"), ("custom_vjp", "xla")):
    step = make_step(impl)
    mem = step.lower(*args).compile().memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else -1
    total = (int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - getattr(mem, "alias_size_in_bytes", 0)) if mem is not None else -1)
    out[name] = {"step_s": _median_time(step, args, warmup, iters), "bytes": total,
                 "temp_bytes": temp}
  out["speedup"] = out["naive"]["step_s"] / out["custom_vjp"]["step_s"]
  out["temp_ratio"] = out["naive"]["temp_bytes"] / max(out["custom_vjp"]["temp_bytes"], 1)
  out["config"] = dict(n_experts=n_experts, d=d, T=T, k=k, op=op, dtype=jnp.dtype(dtype).name,
                       chunk_size=chunk_size, backend=jax.default_backend())
  return out
