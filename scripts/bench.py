"""Benchmarks (DESIGN.md section 9): training-step throughput, step time and peak memory per
architecture, and forward / forward+backward time per kernel op, each with its ratio to the baseline
measured in the same run. Prints a table and writes JSON.

  python scripts/bench.py --suite=arch            # every architecture, tiny LM, MQAR shapes
  python scripts/bench.py --suite=titans          # Titans at T = 1k, 4k, 16k: memory grows linearly
  python scripts/bench.py --suite=kernels         # ops: reference vs xla (vs pallas on GPU)
  python scripts/bench.py --suite=experts         # PEER expert reads at N = 256^2 and 1024^2
  python scripts/bench.py --suite=all --json=bench.json

Peak memory is XLA's compiled estimate (arguments + outputs + temporaries of the jitted step), the
same quantity on every backend; on GPU the device's peak_bytes_in_use is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402


def timeit(fn, *args, warmup=2, iters=5):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def compiled_bytes(jitted, *args) -> int:
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))


def lm_step_bench(spec: str, batch: int, seq_len: int, iters: int):
  from memarch import configs_lib
  from memarch.lm import LM, count_params
  from memarch.sharding import mesh_context
  from memarch.train import cross_entropy
  cfg = configs_lib.load_config(spec)
  lm_cfg = configs_lib.lm_config(cfg, cfg.data.vocab_size)
  with mesh_context():
    model = LM(lm_cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  def step(state, tokens):
    model, opt = nnx.merge(graphdef, state)
    def loss(model):
      logits, _ = model(tokens)
      return cross_entropy(logits[:, :-1], tokens[:, 1:])[0]
    l, g = nnx.value_and_grad(loss)(model)
    opt.update(model, g)
    return nnx.state((model, opt)), l

  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len), 0, lm_cfg.vocab_size)
  jitted = jax.jit(step)
  mem = compiled_bytes(jitted, state, tokens)
  t = timeit(lambda s, x: jitted(s, x)[1], state, tokens, iters=iters)
  return dict(name=spec, params=count_params(model), batch=batch, seq_len=seq_len, step_s=t,
              tokens_per_s=batch * seq_len / t, peak_bytes=mem)


ARCHS = ["configs/transformer.py", "configs/titans.py:variant=mac", "configs/titans.py:variant=mag",
         "configs/titans.py:variant=mal", "configs/titans.py:variant=lmm",
         "configs/gated_deltanet.py", "configs/mom.py"]


def suite_arch(args):
  rows = []
  for spec in ARCHS:
    try:
      rows.append(lm_step_bench(spec, args.batch, args.seq_len, args.iters))
    except Exception as e:  # noqa: BLE001 - report and continue
      rows.append(dict(name=spec, error=f"{type(e).__name__}: {e}"[:200]))
  base = next((r for r in rows if r["name"] == ARCHS[0] and "step_s" in r), None)
  for r in rows:
    if base and "step_s" in r:
      r["speed_vs_transformer"] = base["step_s"] / r["step_s"]
      r["memory_vs_transformer"] = r["peak_bytes"] / base["peak_bytes"]
  return rows


def suite_titans(args):
  rows = []
  for t in (1024, 4096, 16384):
    for variant in ("lmm", "mac"):
      spec = f"configs/titans.py:variant={variant}"
      try:
        rows.append(lm_step_bench(spec, 1, t, max(2, args.iters // 2)))
      except Exception as e:  # noqa: BLE001
        rows.append(dict(name=spec, seq_len=t, error=f"{type(e).__name__}: {e}"[:200]))
  return rows


def _kernel_rows(name, make_fn, args_, impls):
  rows = []
  for impl in impls:
    f = make_fn(impl)
    fwd = jax.jit(f)
    def loss(*a):
      o, s = f(*a)
      return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s.astype(jnp.float32) ** 2) \
          if not isinstance(s, (tuple, dict)) else jnp.sum(o.astype(jnp.float32) ** 2)
    bwd = jax.jit(jax.grad(loss, argnums=tuple(range(3))))
    try:
      rows.append(dict(name=name, impl=impl, fwd_s=timeit(fwd, *args_),
                       fwd_bwd_s=timeit(bwd, *args_), fwd_bwd_peak_bytes=compiled_bytes(bwd, *args_)))
    except Exception as e:  # noqa: BLE001
      rows.append(dict(name=name, impl=impl, error=f"{type(e).__name__}: {e}"[:200]))
  ref = rows[0]
  for r in rows:
    if "fwd_s" in r and "fwd_s" in ref:
      r["fwd_bwd_speedup_vs_first"] = ref["fwd_bwd_s"] / r["fwd_bwd_s"]
  return rows


def suite_kernels(args):
  from pallas_kernels import gated_delta_rule
  on_gpu = jax.default_backend() == "gpu"
  b, t, h, d = (4, 4096, 16, 128) if on_gpu else (1, 512, 2, 64)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(ks[0], (b, t, h, d), dtype)
  k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, d), dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  g = -jax.nn.softplus(jax.random.normal(ks[4], (b, t, h)))
  impls = ["xla", "reference"] + (["pallas_gpu"] if on_gpu else [])
  rows = _kernel_rows(
      "gated_delta_rule", lambda impl: (lambda q, k, v: gated_delta_rule(
          q, k, v, beta, g, implementation=impl)), (q, k, v), impls)
  try:
    from pallas_kernels.titans_memory import init_memory_state, titans_memory
    tb, tt, th, td = (4, 4096, 16, 64) if on_gpu else (1, 512, 2, 16)
    e = 4 * td
    w0 = (0.1 * jax.random.normal(ks[0], (th, e, td)), 0.1 * jax.random.normal(ks[1], (th, td, e)))
    state = init_memory_state(w0, tb)
    qq = jax.random.normal(ks[2], (tb, tt, th, td))
    qq = qq / jnp.linalg.norm(qq, axis=-1, keepdims=True)
    theta = jnp.full((tb, tt, th, 2), 0.05)
    eta = jnp.full((tb, tt, th), 0.9)
    log_a = jnp.full((tb, tt, th), -0.01)
    ln = (jnp.ones((th, td)), jnp.zeros((th, td)))
    rows += _kernel_rows(
        "titans_memory", lambda impl: (lambda q, k, v: titans_memory(
            q, k, v, theta, eta, log_a, *ln, state=state, chunk_size=16, implementation=impl)[0:1]
            + (jnp.zeros(()),)), (qq, qq, qq), ["xla", "reference"])
  except ImportError as e:
    rows.append(dict(name="titans_memory", error=str(e)))
  return rows


def suite_experts(args):
  """PEER/UltraMem expert reads: custom-VJP (sorted segment-sum backward) vs naive take + einsum,
  at N = 256^2 and 1024^2 experts (d 256, k 128 rows per token)."""
  from pallas_kernels.expert_gather.bench import bench_expert_gather
  rows = []
  for n in (256 ** 2, 1024 ** 2):
    r = bench_expert_gather(n, 256, args.expert_tokens, 128, op="mlp", iters=max(2, args.iters // 2))
    for path in ("naive", "custom_vjp"):
      rows.append(dict(name="expert_mlp", n_experts=n, tokens=args.expert_tokens, impl=path,
                       step_s=r[path]["step_s"], peak_bytes=r[path]["bytes"],
                       temp_bytes=r[path]["temp_bytes"]))
    rows[-1]["speedup_vs_naive"] = r["speedup"]
  return rows


def print_table(title, rows):
  print(f"\n== {title} ({jax.devices()[0].device_kind}, jax {jax.__version__}) ==")
  keys = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  print(" | ".join(keys))
  for r in rows:
    cells = []
    for k in keys:
      v = r.get(k, "")
      cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    print(" | ".join(cells))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--suite", default="arch",
                 choices=["arch", "titans", "kernels", "experts", "all"])
  p.add_argument("--expert_tokens", type=int, default=1024)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--json", default="bench.json")
  args = p.parse_args()
  out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}
  suites = ["arch", "titans", "kernels", "experts"] if args.suite == "all" else [args.suite]
  for s in suites:
    rows = {"arch": suite_arch, "titans": suite_titans, "kernels": suite_kernels,
            "experts": suite_experts}[s](args)
    print_table(s, rows)
    out[s] = rows
  with open(args.json, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
