"""What the Pallas GPU kernels will cost on a Hopper GPU, read without one (device README, METHOD.md:
"read what costs no device time"): lowers each kernel for CUDA on CPU, keeps its Triton IR, compiles
it for sm_90 with Triton, and reports shared memory per block and ptxas' registers / spill bytes.

`--only=titans` keeps the Titans memory kernels (depth 2 at D = 64, E = 256, chunk 16, and
depth 1 at D = 128): their Triton compile takes minutes each on CPU.

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

NUM_WARPS = 4   # the kernels' compiler params (pltriton.CompilerParams) use 4 warps
# kernels (by file name prefix) compiled with other warps than NUM_WARPS (Titans: pallas_gpu._Config,
# 8 at depth 2, 4 at depth 1); dump() records them per file
KERNEL_WARPS = {"titans_memory_chunk": 8, "titans_memory_depth1": 4}


def _titans_case(d, e, chunk, depth=2):
  """Titans memory at depth 2 (D = d, E = e) or 1 (D = d), forward and backward kernels."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels.titans_memory import titans_memory
  S, f32 = jax.ShapeDtypeStruct, jnp.float32
  b, t, h = 1, 2 * chunk, 2
  tok, gate = S((b, t, h, d), f32), S((b, t, h), f32)
  ws = tuple(S((b, h) + s, f32) for s in (((e, d), (d, e)) if depth == 2 else ((d, d),)))

  def fn(q, k, v, theta, eta, log_a, ln_s, ln_b, w, s, wb, phase):
    st = {"w": w, "s": s, "w_base": wb, "phase": phase}
    o, new = titans_memory(q, k, v, theta, eta, log_a, ln_s, ln_b, state=st, chunk_size=chunk,
                           implementation="pallas_gpu")
    return o, new["w"], new["s"]

  return fn, (tok, tok, tok, S((b, t, h, depth), f32), gate, gate, S((h, d), f32), S((h, d), f32),
              ws, ws, ws, S((b,), jnp.int32))


def dump(out_dir, d=128, chunk=64, titans=(64, 256, 16), only=""):
  import jax
  import jax.numpy as jnp

  from pallas_kernels.testing import triton_modules
  os.makedirs(out_dir, exist_ok=True)

  S = jax.ShapeDtypeStruct
  bf16, f32 = jnp.bfloat16, jnp.float32
  from pallas_kernels import gated_delta_rule, linear_attention
  from pallas_kernels.block_retrieval_attention import pallas_gpu as brg
  from pallas_kernels.expert_gather import expert_gather
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
      "titans_memory": _titans_case(*titans),
      "titans_memory_depth1": _titans_case(titans[0] * 2, None, titans[2], depth=1),
  }
  files = []   # a kernel's file is its name, prefixed by its case where the name lacks the case
  with triton_modules() as modules:
    for case, (fn, specs) in cases.items():
      if only not in case:
        continue
      n_before = len(modules)
      loss = lambda *a, fn=fn: sum(jnp.sum(x.astype(f32) ** 2) for x in jax.tree.leaves(fn(*a)))
      argnums = tuple(i for i, s in enumerate(specs)
                      if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(s)))
      jax.jit(jax.grad(loss, argnums=argnums)).trace(*specs).lower(lowering_platforms=("cuda",))
      files += [case] * (len(modules) - n_before)
  warps = {}
  for case, asm in zip(files, (m.operation.get_asm(enable_debug_info=False) for m in modules)):
    name = re.search(r"tt\.func public @(\w+)", asm).group(1)
    name = name if name.startswith(case) else f"{case}__{name}"
    with open(os.path.join(out_dir, name + ".ttir"), "w") as f:
      f.write(asm)
    warps[name] = next((w for p, w in KERNEL_WARPS.items() if name.startswith(p)), NUM_WARPS)
  with open(os.path.join(out_dir, "num_warps.json"), "w") as f:
    json.dump(warps, f, indent=1)
  print(f"{len(modules)} Triton modules in {out_dir}")


def compile_all(in_dir, num_warps=None, only=""):
  """num_warps None: each kernel's own (dump's num_warps.json), else NUM_WARPS."""
  import triton
  from triton.backends.compiler import GPUTarget
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  warps_path = os.path.join(in_dir, "num_warps.json")
  warps = json.load(open(warps_path)) if os.path.exists(warps_path) else {}
  rows = []
  for path in sorted(glob.glob(os.path.join(in_dir, f"*{only}*.ttir"))):
    name = os.path.basename(path)[:-5]
    row = dict(kernel=name, num_warps=num_warps or warps.get(name, NUM_WARPS))
    num_warps_k = row["num_warps"]
    try:
      k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps_k, "num_stages": 1})
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
  p.add_argument("--num_warps", type=int, default=None,
                 help="override every kernel's warps (default: each kernel's own)")
  p.add_argument("--only", default="",
                 help="dump / compile only the kernels whose name contains this")
  p.add_argument("--d", type=int, default=128, help="head dim of the dumped kernels")
  p.add_argument("--chunk", type=int, default=64, help="recurrence chunk of the dumped kernels")
  p.add_argument("--titans", default="64,256,16",
                 help="D,E,chunk of the dumped Titans memory kernels at depth 2 (depth 1: 2 D)")
  a = p.parse_args()
  if a.dump:
    dump(a.dump, a.d, a.chunk, tuple(int(x) for x in a.titans.split(",")), a.only)
  if a.compile:
    compile_all(a.compile, a.num_warps, a.only)
