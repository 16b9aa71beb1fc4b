"""What the Pallas GPU kernels will cost on a Hopper GPU, read without one (device README, METHOD.md:
"read what costs no device time"): lowers each kernel for CUDA on CPU, keeps its Triton IR, compiles
it for sm_90 with Triton, and reports shared memory per block and ptxas' registers / spill bytes.

Needs a Triton matching the GPU machine's (3.6.0) in a separate environment, since the project's
CPU venv has none:
  python scripts/triton_resources.py --dump=/tmp/ttir             # project venv: Triton IR files
  /path/to/venv-with-triton/bin/python scripts/triton_resources.py --compile=/tmp/ttir
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NUM_WARPS = 4   # the kernels' compiler params (pltriton.CompilerParams) use 4 warps


def dump(out_dir, d=128, chunk=64):
  import jax
  import jax.numpy as jnp
  from pallas_kernels.testing import triton_modules
  os.makedirs(out_dir, exist_ok=True)

  S = jax.ShapeDtypeStruct
  bf16, f32 = jnp.bfloat16, jnp.float32
  from pallas_kernels import gated_delta_rule, linear_attention
  from pallas_kernels.expert_gather import expert_gather
  from pallas_kernels.block_retrieval_attention import pallas_gpu as brg
  b, t, h = 1, 256, 2
  tok, gate = S((b, t, h, d), bf16), S((b, t, h), f32)
  cases = {
      "gated_delta_rule": (lambda q, k, v, be, g: gated_delta_rule(
          q, k, v, be, g, chunk_size=chunk, implementation="pallas_gpu"), (tok, tok, tok, gate, gate)),
      "linear_attention": (lambda q, k, v, g: linear_attention(
          q, k, v, g, chunk_size=chunk, implementation="pallas_gpu"), (tok, tok, tok, gate)),
      "expert_gather": (lambda u, w: expert_gather(u, jnp.zeros((1024, 128), jnp.int32), w,
                                                   implementation="pallas_gpu"),
                        (S((65536, 256), f32), S((1024, 128), f32))),
      "block_retrieval_attention": (lambda q, bk, bv, g, al: brg.block_retrieval_attention_pallas_gpu(
          q, bk, bv, g, al, k=None, chunk_size=64),
          (tok, S((b, 4, 63, h, d), bf16), S((b, 4, 63, h, d), bf16), S((b, t, h, 4), f32),
           S((b, t, 4), jnp.bool_))),
  }
  with triton_modules() as modules:
    for name, (fn, specs) in cases.items():
      loss = lambda *a, fn=fn: sum(jnp.sum(x.astype(f32) ** 2) for x in jax.tree.leaves(fn(*a)))
      argnums = tuple(i for i, s in enumerate(specs) if jnp.issubdtype(s.dtype, jnp.floating))
      jax.jit(jax.grad(loss, argnums=argnums)).trace(*specs).lower(lowering_platforms=("cuda",))
  for asm in (m.operation.get_asm(enable_debug_info=False) for m in modules):
    name = re.search(r"tt\.func public @(\w+)", asm).group(1)
    with open(os.path.join(out_dir, name + ".ttir"), "w") as f:
      f.write(asm)
  print(f"{len(modules)} Triton modules in {out_dir}")


def compile_all(in_dir, num_warps):
  import triton
  from triton.backends.compiler import GPUTarget
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  rows = []
  for path in sorted(glob.glob(os.path.join(in_dir, "*.ttir"))):
    row = dict(kernel=os.path.basename(path)[:-5], num_warps=num_warps)
    try:
      k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps, "num_stages": 1})
      row["shared_KiB"] = round(k.metadata.shared / 1024, 1)
      ptx = path + ".ptx"
      with open(ptx, "w") as f:
        f.write(k.asm["ptx"])
      res = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", "/dev/null"],
                           capture_output=True, text=True).stderr
      regs = re.search(r"Used (\d+) registers", res)
      spill = re.search(r"(\d+) bytes spill stores", res)
      row.update(registers=int(regs.group(1)) if regs else None,
                 spill_store_bytes=int(spill.group(1)) if spill else None,
                 fits_H100=k.metadata.shared <= 232448)
    except Exception as e:  # noqa: BLE001 - report and continue
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--dump")
  p.add_argument("--compile")
  p.add_argument("--num_warps", type=int, default=NUM_WARPS)
  p.add_argument("--d", type=int, default=128, help="head dim of the dumped kernels")
  p.add_argument("--chunk", type=int, default=64, help="recurrence chunk of the dumped kernels")
  a = p.parse_args()
  if a.dump:
    dump(a.dump, a.d, a.chunk)
  if a.compile:
    compile_all(a.compile, a.num_warps)
