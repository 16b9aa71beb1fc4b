"""Shared helpers for kernel parity tests: tolerances, random inputs, gradient comparison."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Relative-RMS tolerances per dtype (flash-linear-attention style).
TOL = {jnp.float64: 1e-9, jnp.float32: 2e-4, jnp.bfloat16: 2e-2}


def tol_for(dtype) -> float:
  return TOL[jnp.dtype(dtype).type]


def rel_rms(x, ref) -> float:
  """||x - ref||_rms / ||ref||_rms (0 when both are zero)."""
  x = np.asarray(jnp.asarray(x, jnp.float64) if jax.config.jax_enable_x64 else x, np.float64)
  ref = np.asarray(ref, np.float64)
  num = np.sqrt(np.mean((x - ref) ** 2))
  den = np.sqrt(np.mean(ref ** 2))
  return float(num / den) if den > 0 else float(num)


def assert_close(x, ref, tol: float, name: str = "") -> None:
  err = rel_rms(x, ref)
  assert np.all(np.isfinite(np.asarray(x, np.float64))), f"{name}: non-finite values"
  assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def assert_tree_close(xs, refs, tol: float, name: str = "") -> None:
  flat_x, tree_x = jax.tree.flatten(xs)
  flat_r, tree_r = jax.tree.flatten(refs)
  assert tree_x == tree_r, f"{name}: tree structure differs: {tree_x} vs {tree_r}"
  for i, (x, r) in enumerate(zip(flat_x, flat_r)):
    assert x.shape == r.shape, f"{name}[{i}]: shape {x.shape} vs {r.shape}"
    assert_close(x, r, tol, f"{name}[{i}]")


def pallas_modes(*impls):
  """pytest params (implementation, interpret): each Pallas implementation in interpret mode (the
  CPU suite), plus `pallas_gpu` compiled for the device, marked `gpu` (skipped without one)."""
  import pytest
  modes = [pytest.param(i, True, id=f"{i}-interpret") for i in impls]
  if "pallas_gpu" in impls:
    modes.append(pytest.param("pallas_gpu", False, id="pallas_gpu-device", marks=pytest.mark.gpu))
  return modes


def on_device(*values):
  """One parametrize case compiled for the GPU, marked `gpu` (skipped without one)."""
  import pytest
  return pytest.param(*values, id="device", marks=pytest.mark.gpu)


@contextlib.contextmanager
def triton_modules():
  """Collects the Triton module of every Pallas kernel the CUDA lowering builds in the block (a
  list of MLIR modules; verified, and printable with `.operation.get_asm()`). Uses jax's private
  Triton lowering entry point (the same in jax 0.10 and 0.11)."""
  from jax._src.pallas.triton import lowering as triton_lowering
  build, modules = triton_lowering.lower_jaxpr_to_triton_module, []

  def build_and_keep(*args, **kwargs):
    result = build(*args, **kwargs)
    result.module.operation.verify()   # raises with the failing op, as the GPU compiler would
    modules.append(result.module)
    return result

  triton_lowering.lower_jaxpr_to_triton_module = build_and_keep
  try:
    yield modules
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = build


def random_normal(key, shapes: Sequence[tuple[int, ...]], dtype=jnp.float32, scale: float = 1.0):
  keys = jax.random.split(key, len(shapes))
  return [scale * jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def grads_of(fn: Callable, args: Sequence, argnums: Sequence[int], key=None):
  """Gradients of <fn(*args), random cotangent> w.r.t. args[argnums] (fn returns a pytree)."""
  key = jax.random.PRNGKey(0) if key is None else key

  def loss(*a):
    out = fn(*a)
    leaves = jax.tree.leaves(out)
    ks = jax.random.split(key, len(leaves))
    # float64 outputs get float64 cotangents: float32 normals drawn inside two different
    # compiled programs may differ in the last bit (XLA:CPU's classic emitters), ~3e-8 apart.
    acc = lambda l: jnp.float64 if l.dtype == jnp.float64 else jnp.float32
    return sum(jnp.sum(l.astype(acc(l)) * jax.random.normal(k, l.shape, acc(l)))
               for l, k in zip(leaves, ks))

  return jax.grad(loss, argnums=tuple(argnums))(*args)
