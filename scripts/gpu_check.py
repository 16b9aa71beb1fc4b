"""The prepared GPU-machine check (docs/design.md, "Adding a kernel op"): the kernel bench tables
of `scripts/bench.py` on the device, each with its on-device parity column (max relative error of
outputs and gradients against `xla`) and its ratio to the baseline measured in the same run.
On-device parity tests run separately: `JAX_PLATFORMS=cuda python -m pytest -m gpu tests/pallas_kernels`.

  python scripts/gpu_check.py --parts=recurrence,retrieval,experts,titans --json=gpu.json

`recurrence` also runs flash-linear-attention's Triton kernels beside ours when `fla` imports
(carry the fla-core wheel: scripts/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import json
import time

import bench  # a sibling script: python puts scripts/ on sys.path
import jax

SMOKE = ("configs/gated_deltanet.py", "configs/mom.py", "configs/peer.py", "configs/landmark.py",
         "configs/titans.py")


def smoke_rows(args):
  """One tiny MQAR training step per architecture with a Pallas kernel, on the default dispatch
  (which prefers pallas_gpu on a GPU): the kernels run inside real layers, forward and backward."""
  rows = []
  for spec in SMOKE:
    try:
      rows.append(bench.lm_step_bench(spec, 64, 64, 3))
    except Exception as e:  # noqa: BLE001 - report and continue
      rows.append(dict(name=spec, error=f"{type(e).__name__}: {e}"[:300]))
    bench.progress(rows[-1])
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--parts", default="smoke,recurrence,retrieval,experts,titans")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--json", default="gpu_check.json")
  args = p.parse_args()
  bench_args = argparse.Namespace(iters=args.iters, expert_tokens=1024, expert_dim=256,
                                  expert_k=128, expert_sizes="65536,1048576")
  parts = {"smoke": smoke_rows,
           "recurrence": bench.recurrence_kernel_rows,
           "retrieval": lambda a: bench.retrieval_attention_rows(jax.default_backend()),
           "experts": bench.suite_experts,
           "titans": lambda a: bench.titans_kernel_rows(a)}
  out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for name in args.parts.split(","):
    t = time.perf_counter()
    try:
      out[name] = parts[name](bench_args)
    except Exception as e:  # noqa: BLE001 - one broken part must not hide the others
      out[name] = [dict(name=name, error=f"{type(e).__name__}: {e}"[:400])]
    bench.print_table(f"{name} ({time.perf_counter() - t:.0f} s)", out[name])
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
