"""Where a training step's time goes, per source function (memarch/profiling.py).

  python scripts/profile_step.py                                   # Titans MAC, MQAR 64/4
  python scripts/profile_step.py --config=configs/titans.py:variant=mag --batch=64 --seq_len=64

Compiles the config's training step on random tokens, runs it under jax.profiler and attributes
every executed XLA op to the innermost source line of this repository that produced it. Prints the
step's wall time (unprofiled and profiled), then CPU time per step by function and by phase
(forward / backward, recomputes included in the backward). Per-op times are summed over threads,
so they add up to CPU time, and the profiler itself adds a cost per op: read the shares, not the
absolute numbers. Step timings for reports come from scripts/bench.py.
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import jax
import numpy as np

from memarch.profiling import build_train_step, op_breakdown


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/titans.py")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--top", type=int, default=25, help="rows of the by-function table")
  p.add_argument("--json", default="", help="also write the rows here")
  args = p.parse_args()
  step = build_train_step(args.config, args.batch, args.seq_len)
  state, times = step.state, []
  for i in range(args.iters + 2):
    t = time.perf_counter()
    state, m = step.compiled(state, step.batch)
    jax.block_until_ready(m)
    if i >= 2:
      times.append(time.perf_counter() - t)
  step = step._replace(state=state)
  rows, wall = op_breakdown(step, iters=args.iters)
  total = sum(r.seconds for r in rows)
  print(f"{args.config}, batch {args.batch} x {args.seq_len}: compile {step.compile_s:.1f} s, step "
        f"{np.median(times) * 1e3:.0f} ms ({wall * 1e3:.0f} ms profiled), "
        f"{sum(r.count for r in rows)} ops and {total * 1e3:.0f} ms CPU per step")
  by_fn, n_fn = collections.Counter(), collections.Counter()
  by_phase = collections.Counter()
  for r in rows:
    key = f"{r.path} {r.function}" if r.path else r.function
    by_fn[key] += r.seconds
    n_fn[key] += r.count
    by_phase[r.phase] += r.seconds
  print("\n| phase | CPU ms per step | share |\n|---|---|---|")
  for k, v in by_phase.most_common():
    print(f"| {k} | {v * 1e3:.0f} | {v / total:.0%} |")
  print("\n| function (innermost frame in the repository) | ops | CPU ms per step | share |\n"
        "|---|---|---|---|")
  for k, v in by_fn.most_common(args.top):
    print(f"| `{k}` | {n_fn[k]} | {v * 1e3:.1f} | {v / total:.1%} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump([r._asdict() for r in rows], f, indent=1)


if __name__ == "__main__":
  main()
