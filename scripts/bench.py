"""Benchmarks (docs/design.md; the tables are in docs/results.md): training-step throughput, step
time and peak memory per architecture, and forward / forward+backward time per kernel op, each with
its ratio to the baseline measured in the same run. Prints a table and writes JSON.

  python scripts/bench.py --suite=arch            # every architecture, tiny LM, MQAR shapes
  python scripts/bench.py --suite=arch --archs=configs/miras.py:variant=yaad,configs/miras.py:variant=memora \
      --iters=10 --rounds=4                       # interleaved rounds: ratios hold when the CPU drifts
  python scripts/bench.py --suite=titans          # Titans at T = 1k, 4k, 16k: memory grows linearly
  python scripts/bench.py --suite=kernels         # ops: reference vs xla (vs pallas on GPU), incl.
                                                  # landmark attention vs dot_product_attention
  python scripts/bench.py --suite=experts         # PEER expert reads at N = 256^2 and 1024^2
  python scripts/bench.py --suite=experts --expert_sizes=4096,65536 --expert_dim=64 --expert_k=32
  python scripts/bench.py --suite=remat --seq_len=2048 --batch=1   # model.remat policies, 170m
  python scripts/bench.py --suite=scan --iters=0      # compile time, loop vs scanned blocks, 340m
  python scripts/bench.py --suite=scale --seq_len=512 --batch=1 --iters=1 --warmup=0 --isolate
                                                      # remat policies x scanned x bf16, 340m
  python scripts/bench.py --suite=all --json=bench.json

Peak memory is XLA's compiled estimate (arguments + outputs + temporaries of the jitted step), the
same quantity on every backend; on GPU the device's peak_bytes_in_use is printed too.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from memarch.flops import device_peak, recurrence_flops_per_token


def progress(row):
  """One finished row, printed at once (a long device run shows what it has done so far)."""
  cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
  print("  [row] " + " ".join(cells), flush=True)


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
  return memory_bytes(jitted.lower(*args).compile())


def memory_bytes(compiled) -> int:
  """XLA's peak estimate of a compiled program: arguments + outputs + temporaries - aliased."""
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))


def prepare_lm_step(spec: str, batch: int, seq_len: int, overrides=None):
  """(row, run, batch) of a config's training step (memarch.step.jit_train_step: the optimizer,
  accumulation and auxiliary losses of the config) on random tokens, compiled once (compile_s);
  `overrides` {'model.remat': 'full', ...} change config fields. run(batch) takes one step."""
  from memarch.profiling import build_train_step
  step = build_train_step(spec, batch, seq_len, overrides)
  box = [step.state]

  def run(b):  # the step donates its state: thread it through
    box[0], m = step.compiled(box[0], b)
    return m["loss"]

  row = dict(name=spec, **{k.split(".")[-1]: v for k, v in (overrides or {}).items()},
             params=step.params, batch=batch, seq_len=seq_len,
             peak_bytes=memory_bytes(step.compiled), compile_s=step.compile_s)
  return row, run, step.batch


def lm_step_bench(spec: str, batch: int, seq_len: int, iters: int, overrides=None, warmup=2):
  """Step time (median of `iters` steps) and compiled peak memory of a config's training step
  (`prepare_lm_step`); iters=0 compiles only."""
  row, run, b = prepare_lm_step(spec, batch, seq_len, overrides)
  if iters:
    t = timeit(run, b, warmup=warmup, iters=iters)
    row.update(step_s=t, tokens_per_s=batch * seq_len / t)
  return row


def interleaved_step_times(runs, iters: int, rounds: int, warmup=2) -> list[list[float]]:
  """Per run, the step times of `rounds` rounds in which every run takes `iters` timed steps in
  turn: a slow stretch of the machine then hits every config alike, so their ratios hold."""
  for run, b in runs:
    for _ in range(warmup):
      jax.block_until_ready(run(b))
  times = [[] for _ in runs]
  for _ in range(rounds):
    for i, (run, b) in enumerate(runs):
      for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(run(b))
        times[i].append(time.perf_counter() - t)
  return times


def split_specs(text: str) -> list[str]:
  """--archs: config specs separated by commas; a spec's own options keep theirs
  ('configs/titans.py:variant=mac,size=340m,configs/mom.py' is two specs)."""
  return [t for t in re.split(r",(?=[^,]*\.py)", text) if t]


ARCHS = ["configs/transformer.py", "configs/titans.py:variant=mac", "configs/titans.py:variant=mag",
         "configs/titans.py:variant=mal", "configs/titans.py:variant=lmm",
         "configs/gated_deltanet.py", "configs/mom.py", "configs/miras.py:variant=yaad",
         "configs/miras.py:variant=moneta", "configs/miras.py:variant=memora"]


def suite_arch(args):
  """Training-step time and compiled peak memory per config; ratios against the first config
  (`--archs=a.py,b.py`, default: every family, the transformer first)."""
  specs = split_specs(args.archs) if args.archs else ARCHS
  if args.rounds > 1:
    return arch_interleaved(specs, args)
  rows = []
  for spec in specs:
    try:
      rows.append(lm_step_bench(spec, args.batch, args.seq_len, args.iters))
    except Exception as e:  # noqa: BLE001 - report and continue
      rows.append(dict(name=spec, error=f"{type(e).__name__}: {e}"[:200]))
    progress(rows[-1])
  return with_ratios(rows, specs[0])


def with_ratios(rows, first: str):
  base = next((r for r in rows if r["name"] == first and "step_s" in r), None)
  for r in rows:
    if base and "step_s" in r:
      r["step_vs_first"] = r["step_s"] / base["step_s"]
      r["memory_vs_first"] = r["peak_bytes"] / base["peak_bytes"]
  return rows


def arch_interleaved(specs, args):
  """`--rounds=N`: every config compiled first, then timed in N interleaved rounds of `--iters`
  steps (`interleaved_step_times`); step_s is the median over all rounds, and
  step_vs_first_min/max the range of the per-round ratios to the first config."""
  prepared = []
  for spec in specs:
    row, run, b = prepare_lm_step(spec, args.batch, args.seq_len)
    progress(row)
    prepared.append((row, run, b))
  times = interleaved_step_times([(run, b) for _, run, b in prepared], args.iters, args.rounds)
  rows = []
  for (row, _, _), ts in zip(prepared, times):
    t = float(np.median(ts))
    row.update(step_s=t, tokens_per_s=args.batch * args.seq_len / t, rounds=args.rounds)
    rows.append(row)
  round_median = lambda ts, k: float(np.median(ts[k * args.iters:(k + 1) * args.iters]))
  for row, ts in zip(rows, times):
    per_round = [round_median(ts, k) / round_median(times[0], k) for k in range(args.rounds)]
    row.update(step_vs_first_min=min(per_round), step_vs_first_max=max(per_round))
  return with_ratios(rows, specs[0])


# XLA:CPU's concurrency-optimised scheduler hoists rematerialised computations into the forward
# pass (peak memory as without remat); the default list scheduler keeps them in the backward pass.
CPU_REMAT_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

REMAT_ARCHS = ["configs/transformer.py:size=170m", "configs/titans.py:variant=mac,size=170m"]


def suite_remat(args):
  """Compiled peak memory, compile time and step time of each `model.remat` policy (`--remat`),
  per config (`--archs`, default the Transformer++ and Titans MAC at size=170m); ratios against
  the first policy of the same config."""
  specs = split_specs(args.archs) if args.archs else REMAT_ARCHS
  rows = []
  for spec in specs:
    first = None
    for policy in args.remat.split(","):
      try:
        row = lm_step_bench(spec, args.batch, args.seq_len, args.iters,
                            overrides={"model.remat": policy}, warmup=args.warmup)
      except Exception as e:  # noqa: BLE001 - report and continue
        row = dict(name=spec, remat=policy, error=f"{type(e).__name__}: {e}"[:200])
      if "peak_bytes" in row:
        first = first or row
        row["memory_vs_first"] = row["peak_bytes"] / first["peak_bytes"]
        if "step_s" in row:
          row["step_vs_first"] = row["step_s"] / first["step_s"]
      rows.append(row)
      progress(row)
  return rows


def suite_scan(args):
  """Compile time and compiled peak memory of the training step with the blocks in a Python loop
  and as a lax.scan over pattern periods (`model.scan_layers`), per config (`--archs`, default
  the Transformer++ at size=340m); step time too unless `--iters=0`."""
  specs = split_specs(args.archs) if args.archs else ["configs/transformer.py:size=340m"]
  rows = []
  for spec in specs:
    for scan in (False, True):
      try:
        row = lm_step_bench(spec, args.batch, args.seq_len, args.iters,
                            overrides={"model.scan_layers": scan}, warmup=args.warmup)
      except Exception as e:  # noqa: BLE001 - report and continue
        row = dict(name=spec, scan_layers=scan, error=f"{type(e).__name__}: {e}"[:200])
      rows.append(row)
      progress(row)
  return rows


SCALE_ARCHS = ["configs/transformer.py:size=340m", "configs/gated_deltanet.py:size=340m",
               "configs/mom.py:size=340m", "configs/titans.py:variant=mac,size=340m"]


def suite_scale(args):
  """Paper-scale settings together: each `model.remat` policy (`--remat`) with scanned layers and
  bfloat16 parameters, per config (`--archs`, default the Transformer++, Gated DeltaNet, MoM and
  Titans MAC at size=340m): compile time, compiled peak memory and step time (`--iters`)."""
  specs = split_specs(args.archs) if args.archs else SCALE_ARCHS
  rows = []
  for spec in specs:
    first = None
    for policy in args.remat.split(","):
      overrides = {"model.remat": policy, "model.scan_layers": True,
                   "model.param_dtype": "bfloat16"}
      try:
        if args.isolate:
          row = isolated_row(args, spec, policy)
        else:
          row = lm_step_bench(spec, args.batch, args.seq_len, args.iters, overrides=overrides,
                              warmup=args.warmup)
      except Exception as e:  # noqa: BLE001 - report and continue
        row = dict(name=spec, remat=policy, error=f"{type(e).__name__}: {e}"[:200])
      if "peak_bytes" in row:
        first = first or row
        row["memory_vs_first"] = row["peak_bytes"] / first["peak_bytes"]
      rows.append(row)
      progress(row)
  return rows


def isolated_row(args, spec: str, policy: str) -> dict:
  """One row of the scale suite in its own process (`--isolate`), so a row killed for host memory
  (XLA's compile of a large step can need more than the machine has) becomes an error row
  instead of ending the run."""
  import subprocess
  import sys
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    cmd = [sys.executable, os.path.abspath(__file__), f"--suite={args.suite}", f"--archs={spec}",
           f"--remat={policy}", f"--seq_len={args.seq_len}", f"--batch={args.batch}",
           f"--iters={args.iters}", f"--warmup={args.warmup}", f"--json={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
      why = ("killed: likely out of host memory" if r.returncode in (-9, 137)
             else (r.stderr.strip().splitlines() or ["no output"])[-1][:160])
      return dict(name=spec, remat=policy, error=f"exit {r.returncode} ({why})")
    with open(out) as f:
      return json.load(f)[args.suite][0]


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
    progress(rows[-1])
  ref = rows[0]
  for r in rows:
    if "fwd_s" in r and "fwd_s" in ref:
      r["fwd_bwd_speedup_vs_first"] = ref["fwd_bwd_s"] / r["fwd_bwd_s"]
  return rows




def recurrence_flops_bytes(op, b, t, h, dk, dv, chunk, itemsize):
  """Algorithmic FLOPs and compulsory HBM bytes of one chunked gated-delta-rule / linear-attention
  call (the chunked form of docs/architectures/gated_deltanet.md), for the forward and for
  forward + backward.

  FLOPs per token and head, from the chunk form's matmuls: gated delta rule 6 K V + 2 C (3 K + 2 V)
  (W S, Q S, K~^T V'; K K^T, T X_w, Q K^T; T X_u, P V'), about 180k at C = 64, K = V = 128; linear
  attention 4 K V + 2 C (K + V). The (I + A)^-1 solve is not counted. fwd+bwd counts 3x the forward,
  the usual convention; the backward's recomputation is not counted either, so TFLOP/s is useful
  work. Bytes: each input read and each output written once (q, k, v, o in the input dtype; beta, g,
  d(beta), dg and the final state in float32), so GB/s is a lower bound on the traffic achieved.
  """
  n = b * t * h
  per_tok = recurrence_flops_per_token(op, dk, dv, chunk)
  gates = 2 if op == "gated_delta_rule" else 1
  state = b * h * dk * dv * 4
  fwd_bytes = n * (itemsize * (2 * dk + 2 * dv) + 4 * gates) + state
  # The backward reads q, k, v, the gates, do and d(final state) and writes dq, dk, dv, dgates.
  bwd_bytes = n * (itemsize * (2 * dk + 2 * dv) + itemsize * (2 * dk + dv) + 8 * gates) + state
  return dict(fwd_flops=n * per_tok, fwd_bwd_flops=3 * n * per_tok, fwd_bytes=fwd_bytes,
              fwd_bwd_bytes=fwd_bytes + bwd_bytes)


def recurrence_kernel_rows(args):
  """gated_delta_rule and linear_attention: forward and forward+backward time per implementation,
  achieved TFLOP/s and GB/s (`recurrence_flops_bytes`), the speedup over `xla` measured in the same
  run, and the relative RMS error of o and of every gradient against `xla` (a parity check on the
  device itself). On GPU / TPU: B, T, H, D = 4, 4096, 16, 128 in bf16, xla vs the Pallas kernel; on
  CPU a small float32 shape, xla vs reference (interpret-mode Pallas timings would mean nothing)."""
  from pallas_kernels import gated_delta_rule, linear_attention
  from pallas_kernels.testing import rel_rms
  backend = jax.default_backend()
  on_device = backend in ("gpu", "tpu")
  b, t, h, d = (4, 4096, 16, 128) if on_device else (1, 512, 2, 64)
  chunk = 64
  dtype = jnp.bfloat16 if on_device else jnp.float32
  impls = ["xla"] + ({"gpu": ["pallas_gpu"], "tpu": ["pallas_tpu"]}.get(backend, ["reference"]))
  kind = jax.devices()[0].device_kind
  peaks = device_peak(kind)  # dense bf16 FLOP/s and HBM bytes/s (datasheets; memarch.flops)
  ks = jax.random.split(jax.random.PRNGKey(1), 8)
  l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = l2(jax.random.normal(ks[0], (b, t, h, d))).astype(dtype)
  k = l2(jax.random.normal(ks[1], (b, t, h, d))).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, d), dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  g = -jax.nn.softplus(-jax.random.normal(ks[4], (b, t, h)) - 2.0)
  do = jax.random.normal(ks[5], (b, t, h, d), dtype)
  dS = jax.random.normal(ks[6], (b, h, d, d))
  ops = {
      "gated_delta_rule": ((q, k, v, beta, g), lambda impl: lambda q, k, v, beta, g:
                           gated_delta_rule(q, k, v, beta, g, chunk_size=chunk, implementation=impl)),
      "linear_attention": ((q, k, v, g), lambda impl: lambda q, k, v, g:
                           linear_attention(q, k, v, g, chunk_size=chunk, implementation=impl)),
  }
  rows, results = [], {}
  for op, (inputs, make) in ops.items():
    cost = recurrence_flops_bytes(op, b, t, h, d, d, chunk, jnp.dtype(dtype).itemsize)
    for impl in impls:
      f = make(impl)
      fwd = jax.jit(f)

      @jax.jit
      def fwd_bwd(*a, f=f):
        out, vjp = jax.vjp(f, *a)
        return out, vjp((do, dS))

      row = dict(name=op, impl=impl, shape=f"{b}x{t}x{h}x{d}", dtype=jnp.dtype(dtype).name)
      try:
        results[op, impl] = jax.block_until_ready(fwd_bwd(*inputs))
        row.update(fwd_s=timeit(fwd, *inputs, iters=args.iters),
                   fwd_bwd_s=timeit(fwd_bwd, *inputs, iters=args.iters))
      except Exception as e:  # noqa: BLE001 - report and continue
        row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        progress(row)
        continue
      for part in ("fwd", "fwd_bwd"):
        tflops = cost[f"{part}_flops"] / row[f"{part}_s"] / 1e12
        gbs = cost[f"{part}_bytes"] / row[f"{part}_s"] / 1e9
        row[f"{part}_tflops"], row[f"{part}_GBps"] = tflops, gbs
        if peaks:
          row[f"{part}_pct_peak_flops"] = 100 * tflops * 1e12 / peaks[0]
          row[f"{part}_pct_peak_hbm"] = 100 * gbs * 1e9 / peaks[1]
      rows.append(row)
      progress(row)
  # FLA last: its Triton autotuning takes minutes on a first run.
  if backend == "gpu" and getattr(args, "fla", True):
    for row in fla_rows(b, t, h, d):
      rows.append(row)
      progress(row)
  for op in ops:
    cost = recurrence_flops_bytes(op, b, t, h, d, d, chunk, jnp.dtype(dtype).itemsize)
    base = next((r for r in rows if r["name"] == op and r["impl"] == "xla" and "fwd_s" in r), None)
    for r in rows:
      if r["name"] != op or "fwd_s" not in r or base is None:
        continue
      r["fwd_speedup_vs_xla"] = base["fwd_s"] / r["fwd_s"]
      r["fwd_bwd_speedup_vs_xla"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
      fla = next((f for f in rows if f["name"] == op and f["impl"] == "fla_triton"
                  and "fwd_bwd_s" in f), None)
      if fla is not None:
        r["fwd_bwd_speedup_vs_fla"] = fla["fwd_bwd_s"] / r["fwd_bwd_s"]
        if r is fla:
          r.update({f"{p}_tflops": cost[f"{p}_flops"] / r[f"{p}_s"] / 1e12 for p in ("fwd", "fwd_bwd")})
      if (op, r["impl"]) in results and r["impl"] != "xla" and (op, "xla") in results:
        (o, s), grads = results[op, r["impl"]]
        (o_x, s_x), grads_x = results[op, "xla"]
        r["max_rel_err_vs_xla"] = max(
            [rel_rms(o.astype(jnp.float32), o_x.astype(jnp.float32)), rel_rms(s, s_x)]
            + [rel_rms(gr.astype(jnp.float32), gx.astype(jnp.float32))
               for gr, gx in zip(grads, grads_x)])
  return rows


def fla_rows(b, t, h, d):
  """flash-linear-attention's Triton chunk kernels (chunk_gated_delta_rule; chunk_simple_gla, its
  scalar-gated linear attention) at our shape, bf16, run beside ours in the same process: the
  comparison with the best public kernels. Needs torch with CUDA and `fla` (carry the wheels to the
  GPU machine); returns no rows otherwise. Timed with CUDA events (triton.testing.do_bench, median)."""
  try:
    import torch
    import triton.testing
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.simple_gla import chunk_simple_gla
  except ImportError:
    return []
  if not torch.cuda.is_available():
    return []
  dev, bf16 = "cuda", torch.bfloat16
  gen = torch.Generator(device=dev).manual_seed(0)
  rnd = lambda *s: torch.randn(*s, device=dev, generator=gen)
  l2 = lambda x: x / x.norm(dim=-1, keepdim=True)
  q, k = l2(rnd(b, t, h, d)).to(bf16), l2(rnd(b, t, h, d)).to(bf16)
  v = rnd(b, t, h, d).to(bf16)
  beta = torch.sigmoid(rnd(b, t, h))
  g = -torch.nn.functional.softplus(-rnd(b, t, h) - 2.0)
  do, dht = rnd(b, t, h, d).to(bf16), rnd(b, h, d, d)
  ops = {"gated_delta_rule": lambda q, k, v, g: chunk_gated_delta_rule(
             q, k, v, g, beta, output_final_state=True),
         "linear_attention": lambda q, k, v, g: chunk_simple_gla(q, k, v, g,
                                                                 output_final_state=True)}
  rows = []
  for name, fn in ops.items():
    row = dict(name=name, impl="fla_triton", shape=f"{b}x{t}x{h}x{d}", dtype="bfloat16")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]

    def fwd_bwd():
      o, ht = fn(*leaves)
      torch.autograd.backward([o, ht], [do, dht])

    try:
      with torch.no_grad():
        row["fwd_s"] = triton.testing.do_bench(lambda: fn(q, k, v, g), return_mode="median") / 1e3
      row["fwd_bwd_s"] = triton.testing.do_bench(fwd_bwd, return_mode="median") / 1e3
    except Exception as e:  # noqa: BLE001 - report and continue
      row["error"] = f"{type(e).__name__}: {e}"[:200]
    rows.append(row)
  return rows


def titans_kernel_rows(args):
  """titans_memory (depth 2, E = 4 D, chunk 16) forward and forward+backward: xla vs reference on
  CPU (B, T, H, D = 1, 512, 2, 16), xla vs the pallas_gpu kernel on GPU (4, 4096, 16, 64; the token
  loop's backward would keep 4096 per-token weight sets there, ~100 GiB), with the kernel's
  relative error of o and d(q, k, v) against xla on the device. Every array is an argument of the
  jitted functions (closed-over arrays would be constant-folded)."""
  from pallas_kernels.testing import rel_rms
  from pallas_kernels.titans_memory import init_memory_state, titans_memory
  on_gpu = jax.default_backend() == "gpu"
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  b, t, h, d = (4, 4096, 16, 64) if on_gpu else (1, 512, 2, 16)
  w0 = (0.1 * jax.random.normal(ks[0], (h, 4 * d, d)), 0.1 * jax.random.normal(ks[1], (h, d, 4 * d)))
  state = init_memory_state(w0, b)
  l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  # Independent q, k, v (with q = k = v the memory's float32 rounding grows chaotically over
  # hundreds of chunks and no two implementations agree past T ~ 256).
  q, k = (l2(jax.random.normal(key, (b, t, h, d))) for key in ks[2:4])
  v = jax.random.normal(ks[4], (b, t, h, d))
  gates = (jnp.full((b, t, h, 2), 0.05), jnp.full((b, t, h), 0.9), jnp.full((b, t, h), -0.01),
           jnp.ones((h, d)), jnp.zeros((h, d)))
  make = lambda impl: (lambda q, k, v, gates, state: (titans_memory(
      q, k, v, *gates, state=state, chunk_size=16, implementation=impl)[0], jnp.zeros(())))
  inputs = (q, k, v, gates, state)
  rows = _kernel_rows("titans_memory", make, inputs,
                      ["xla", "pallas_gpu"] if on_gpu else ["xla", "reference"])
  do = jax.random.normal(ks[5], q.shape)

  @functools.partial(jax.jit, static_argnums=0)
  def outputs_and_grads(impl, do, *a):
    o, vjp = jax.vjp(lambda q, k, v: make(impl)(q, k, v, *a[3:])[0], *a[:3])
    return (o, *vjp(do))

  for r in rows[1:]:
    if "fwd_s" in r:
      errs = [rel_rms(x, y) for x, y in zip(outputs_and_grads(r["impl"], do, *inputs),
                                            outputs_and_grads("xla", do, *inputs))]
      r["max_rel_err_vs_xla"] = max(errs)
  return rows


def suite_kernels(args):
  return recurrence_kernel_rows(args) + titans_kernel_rows(args) + retrieval_attention_rows(
      jax.default_backend())


def _landmark_training_form(q, k, v, L):
  """Landmark attention's training form (Mohtashami & Jaggi 2023, Eq. 1-4;
  docs/architectures/landmark.md) from q, k, v [B, T, H, d] whose every L-th position is a
  landmark: blocks of L-1 content keys gated by the landmark score, every complete past block read
  (k=None), the own block (causal, landmark excluded) as the local part."""
  from pallas_kernels.block_retrieval_attention import block_retrieval_attention
  b, t, h, d = q.shape
  nb = t // L
  blocks = lambda a: a.reshape(b, nb, L, h, d)
  gate = jnp.einsum("bthd,bnhd->bthn", q, blocks(k)[:, :, L - 1],
                    preferred_element_type=jnp.float32) * d ** -0.5
  pos = jnp.arange(t)
  allowed = jnp.broadcast_to(jnp.arange(nb)[None, :] < (pos // L)[:, None], (b, t, nb))
  own = (pos[None, :] // L == pos[:, None] // L) & (pos[None, :] <= pos[:, None]) & (
      pos[None, :] % L != L - 1)
  local = (k, v, jnp.broadcast_to(own, (b, t, t)))
  return lambda impl: block_retrieval_attention(
      q, blocks(k)[:, :, :L - 1], blocks(v)[:, :, :L - 1], gate, allowed, k=None, local=local,
      chunk_size=64 if impl == "pallas_gpu" else 128, implementation=impl)


def retrieval_attention_rows(backend):
  """Landmark training attention (fwd, fwd+bwd) against jax.nn.dot_product_attention (causal) at
  the same (B, T, H, d), and a top-4 decode step over a cache of N blocks (fwd). Our
  target: pallas_gpu landmark fwd+bwd within 1.5x of dot_product_attention at T = 4k. On CPU a small
  float32 shape, xla vs reference only (interpret-mode Pallas timings would mean nothing)."""
  on_gpu, on_device = backend == "gpu", backend in ("gpu", "tpu")
  b, t, h, d = (2, 4096, 16, 128) if on_device else (1, 512, 2, 64)
  L = 64
  dtype = jnp.bfloat16 if on_device else jnp.float32
  ks = jax.random.split(jax.random.PRNGKey(1), 3)
  q, k, v = (jax.random.normal(key, (b, t, h, d), dtype) for key in ks)
  rows = []
  for impl in (["cudnn", "xla"] if on_gpu else ["xla"]):
    rows += _kernel_rows("dot_product_attention", lambda impl_: (
        lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                      implementation=impl_), jnp.zeros(()))),
        (q, k, v), [impl])
  base = next((r for r in rows if "fwd_bwd_s" in r), None)
  impls = ["xla", "reference"] + {"gpu": ["pallas_gpu"], "tpu": ["pallas_tpu"]}.get(backend, [])
  lm = _kernel_rows("landmark_attention", lambda impl: (
      lambda q, k, v: (_landmark_training_form(q, k, v, L)(impl), jnp.zeros(()))),
      (q, k, v), impls)
  for r in lm:
    if base and "fwd_bwd_s" in r:
      r["fwd_vs_dot_product_attention"] = r["fwd_s"] / base["fwd_s"]
      r["fwd_bwd_vs_dot_product_attention"] = r["fwd_bwd_s"] / base["fwd_bwd_s"]
  rows += lm
  # Decode: one new query per sequence over a cache of n blocks of C keys, top-4 by gate.
  from pallas_kernels.block_retrieval_attention import block_retrieval_attention
  n, c = (512, 63) if on_device else (64, 63)
  kk = jax.random.split(jax.random.PRNGKey(2), 4)
  q1 = jax.random.normal(kk[0], (b, 1, h, d), dtype)
  bk, bv = (jax.random.normal(key, (b, n, c, h, d), dtype) for key in kk[1:3])
  gate = jax.random.normal(kk[3], (b, 1, h, n), jnp.float32)
  allowed = jnp.ones((b, 1, n), bool)
  for impl in impls:
    f = jax.jit(lambda q, bk, bv: block_retrieval_attention(q, bk, bv, gate, allowed, k=4,
                                                             implementation=impl))
    try:
      rows.append(dict(name=f"retrieval_decode_n{n}", impl=impl, fwd_s=timeit(f, q1, bk, bv)))
    except Exception as e:  # noqa: BLE001
      rows.append(dict(name=f"retrieval_decode_n{n}", impl=impl,
                       error=f"{type(e).__name__}: {e}"[:200]))
    progress(rows[-1])
  return rows


def suite_experts(args):
  """PEER/UltraMem expert reads, fwd+bwd: naive take + einsum vs custom-VJP (sorted segment-sum
  backward) vs, on GPU/TPU, the Pallas kernels; at N = 256^2 and 1024^2 experts (d 256, k 128 rows
  per token) unless --expert_sizes/--expert_dim/--expert_k say otherwise. gbps is the minimal
  traffic (`expert_gather.bench.bytes_moved`) over the step time; vs_copy divides it by a plain
  device copy's bandwidth measured in the same run (our target: pallas >= 0.5)."""
  from pallas_kernels.expert_gather.bench import bench_expert_gather, copy_bandwidth
  backend = jax.default_backend()
  pallas = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend)
  copy_gbps = copy_bandwidth(1 << 30 if backend in ("gpu", "tpu") else 1 << 26) / 1e9
  rows = [dict(name="device_copy", impl="x + 1", gbps=copy_gbps)]
  sizes = [int(n) for n in args.expert_sizes.split(",")]
  for op in ("mlp", "gather"):
    for n in sizes:
      r = bench_expert_gather(n, args.expert_dim, args.expert_tokens, args.expert_k, op=op,
                              iters=max(2, args.iters // 2), pallas=pallas)
      for path in ("naive", "custom_vjp") + (("pallas",) if pallas else ()):
        rows.append(dict(name=f"expert_{op}", n_experts=n, tokens=args.expert_tokens,
                         impl=pallas if path == "pallas" else path, step_s=r[path]["step_s"],
                         peak_bytes=r[path]["bytes"], temp_bytes=r[path]["temp_bytes"],
                         gbps=r[path]["gbps"], vs_copy=r[path]["gbps"] / copy_gbps,
                         speedup_vs_naive=r["naive"]["step_s"] / r[path]["step_s"]))
        progress(rows[-1])
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
                 choices=["arch", "titans", "kernels", "experts", "remat", "scan", "scale", "all"])
  p.add_argument("--expert_tokens", type=int, default=1024)
  p.add_argument("--expert_sizes", default="65536,1048576", help="table rows N, comma-separated")
  p.add_argument("--expert_dim", type=int, default=256)
  p.add_argument("--expert_k", type=int, default=128, help="rows read per token")
  p.add_argument("--archs", default="", help="arch suite: config specs, comma-separated "
                 "(ratios are against the first)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--iters", type=int, default=5, help="timed steps (remat/scan: 0 = compile only)")
  p.add_argument("--rounds", type=int, default=1,
                 help="arch: time the configs in this many interleaved rounds of --iters steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
  p.add_argument("--remat", default="none,dots,full",
                 help="remat suite: model.remat policies, comma-separated (ratios: vs the first)")
  p.add_argument("--isolate", action="store_true",
                 help="scale suite: each row in its own process (a row killed for memory is reported)")
  p.add_argument("--json", default="bench.json")
  args = p.parse_args()
  if args.rounds < 1 or (args.rounds > 1 and args.iters < 1):
    p.error(f"--rounds={args.rounds} needs rounds >= 1, and --iters >= 1 when rounds > 1")
  if args.suite in ("remat", "scale") and CPU_REMAT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    # Before the backend starts (first device query): XLA:CPU's default scheduler runs a
    # checkpointed block's recomputation early, in the forward pass, so remat saves nothing there.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_REMAT_FLAG).strip()
    print(f"bench: XLA_FLAGS={os.environ['XLA_FLAGS']}", flush=True)
  out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}
  suites = ["arch", "titans", "kernels", "experts"] if args.suite == "all" else [args.suite]
  for s in suites:
    rows = {"arch": suite_arch, "titans": suite_titans, "kernels": suite_kernels,
            "experts": suite_experts, "remat": suite_remat, "scan": suite_scan,
            "scale": suite_scale}[s](args)
    print_table(s, rows)
    out[s] = rows
  with open(args.json, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
