"""CPU-only lowering checks of the Pallas kernels for CUDA (Triton) and TPU (Mosaic): forward and
backward trace and lower without a device, and the lowered module calls the kernel
(docs/design.md, "Adding a kernel op").

On jax 0.11 the CUDA lowering additionally needs an abstract mesh with a CUDA device kind
(`AbstractDevice`); `_lowering_context` supplies it when the API exists.
"""
import contextlib
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import gated_delta_rule, linear_attention
from pallas_kernels.testing import triton_modules

KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
IMPL = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}


def _lowering_context(platform):
  if platform != "cuda" or not jax.__version__.startswith("0.11"):
    return contextlib.nullcontext()
  from jax.sharding import AbstractDevice, AbstractMesh  # jax 0.11 only
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
  return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev))


def _lower(fn, specs, platform):
  # On CUDA every Triton module also goes through the MLIR verifier (seen on an H100: scf.for
  # bounds of two integer types, from a fori_loop with a Python-int bound, failed to compile).
  verify = triton_modules() if platform == "cuda" else contextlib.nullcontext()
  with _lowering_context(platform), verify:
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("op", ["gated_delta_rule", "linear_attention"])
@pytest.mark.parametrize("D,dtype", [(64, jnp.bfloat16), (128, jnp.float32)])
def test_kernel_lowers_forward_and_backward(platform, op, D, dtype):
  B, T, H = 1, 100, 2           # T not a multiple of the chunk
  S = jax.ShapeDtypeStruct
  tok = S((B, T, H, D), dtype)
  gate = S((B, T, H), jnp.float32)
  specs = [tok, tok, tok, gate, S((B, H, D, D), jnp.float32), S((B, T), jnp.int32)]
  if op == "gated_delta_rule":
    specs.insert(3, gate)
    f = lambda q, k, v, b, g, h0, seg: gated_delta_rule(
        q, k, v, b, g, initial_state=h0, segment_ids=seg, implementation=IMPL[platform])
  else:
    f = lambda q, k, v, g, h0, seg: linear_attention(
        q, k, v, g, initial_state=h0, segment_ids=seg, implementation=IMPL[platform])
  n_diff = len(specs) - 1

  def loss(*a):
    o, s = f(*a)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s ** 2)

  fwd = _lower(f, specs, platform)
  bwd = _lower(jax.grad(loss, argnums=tuple(range(n_diff))), specs, platform)
  for txt in (fwd, bwd):
    assert KERNEL_CALL[platform] in set(re.findall(r"custom_call @([\w$.]+)", txt))
  # The gradient runs the Pallas backward kernel (not autodiff of jnp code) next to the forward one.
  kernel_names = lambda txt: set(re.findall(r'name = \\?"(\w+)\\?"', txt))
  assert kernel_names(fwd) == {f"{op}_fwd"}
  assert kernel_names(bwd) == {f"{op}_fwd", f"{op}_bwd"}


def test_unsupported_inputs_fall_back():
  """float64 and odd chunk sizes raise NotImplementedError on the Pallas path; the default
  dispatch never sees them on CPU (xla), and an explicit request fails loudly."""
  x = jnp.zeros((1, 8, 1, 16), jnp.float32)
  gb = jnp.zeros((1, 8, 1), jnp.float32)
  with pytest.raises(NotImplementedError, match="chunk_size"):
    gated_delta_rule(x, x, x, gb, gb, chunk_size=24, implementation="pallas_gpu", interpret=True)
  with pytest.raises(NotImplementedError, match="K, V <= 256"):
    big = jnp.zeros((1, 8, 1, 512), jnp.float32)
    gated_delta_rule(big, big, x, gb, gb, implementation="pallas_gpu", interpret=True)


def test_default_dispatch_prefers_pallas_and_falls_back(monkeypatch):
  """With a GPU-like preference order, implementation=None runs the Pallas kernel when it can and
  falls back to xla on NotImplementedError (here: a chunk size the kernel rejects)."""
  from pallas_kernels import _dispatch
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
  calls = []
  real = pallas_gpu.recurrence_pallas_gpu
  monkeypatch.setattr(pallas_gpu, "recurrence_pallas_gpu",
                      lambda *a, **kw: calls.append(kw["chunk_size"]) or real(*a, **kw))
  x = jnp.ones((1, 20, 1, 16), jnp.float32) * 0.1
  gb = jnp.full((1, 20, 1), -0.1, jnp.float32)
  o_kernel, _ = gated_delta_rule(x, x, x, gb, gb, chunk_size=16, interpret=True)
  o_xla, _ = gated_delta_rule(x, x, x, gb, gb, chunk_size=16, implementation="xla")
  o_fallback, _ = gated_delta_rule(x, x, x, gb, gb, chunk_size=24, interpret=True)
  assert calls == [16, 24]
  assert float(jnp.max(jnp.abs(o_kernel - o_xla))) < 1e-6
  assert float(jnp.max(jnp.abs(o_fallback - o_xla))) < 1e-6


# ----------------------------------------------------------------------------- retrieval ops

@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("op", ["gather", "mlp"])
def test_expert_gather_lowers_forward_and_backward(platform, op):
  """bf16 tokens, float32 tables of width 192 (not a power of two), T not a multiple of the token
  block; the backward includes the sorted segment-sum kernels."""
  from pallas_kernels.expert_gather import expert_gather, expert_mlp
  S = jax.ShapeDtypeStruct
  t, k, n, e, f = 100, 8, 1000, 192, 256
  x, down, up = S((t, e), jnp.bfloat16), S((n, e), jnp.float32), S((n, f), jnp.float32)
  idx, w = S((t, k), jnp.int32), S((t, k), jnp.bfloat16)
  if op == "mlp":
    fn = lambda x, d, u, i, w: expert_mlp(x, d, u, i, w, implementation=IMPL[platform])
    specs, argnums = (x, down, up, idx, w), (0, 1, 2, 4)
  else:
    fn = lambda u, i, w: expert_gather(u, i, w, implementation=IMPL[platform])
    specs, argnums = (up, idx, w), (0, 2)
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)
  fwd = _lower(fn, specs, platform)
  bwd = _lower(jax.grad(loss, argnums=argnums), specs, platform)
  for txt in (fwd, bwd):
    assert KERNEL_CALL[platform] in set(re.findall(r"custom_call @([\w$.]+)", txt))
  forward = {"mlp": "expert_mlp_fwd", "gather": "expert_gather_sum"}[op]
  backward = {"mlp": "expert_mlp_bwd", "gather": "expert_gather_dot"}[op]
  assert _kernel_names(fwd) == {forward}
  assert _kernel_names(bwd) == {forward, backward, "expert_segment_sum"}


def _kernel_names(txt):
  """Names of the Pallas kernels in lowered text (the TPU variants carry a `_tpu` suffix)."""
  return {n.removesuffix("_tpu") for n in re.findall(r'name = \\?"(\w+)\\?"', txt)}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_block_retrieval_attention_lowers_forward_and_backward(platform, decode, dtype):
  """Landmark-like shapes: blocks of C = 63 content keys (padded to 64), a local part with a mask,
  T not a multiple of the query tile, top-k selection, padded keys; training and decode forwards."""
  if platform == "tpu":
    from pallas_kernels.block_retrieval_attention import pallas_tpu
    fwd_fn = pallas_tpu.block_retrieval_attention_pallas_tpu
  else:
    from pallas_kernels.block_retrieval_attention import pallas_gpu
    fwd_fn = pallas_gpu.block_retrieval_attention_pallas_gpu
  S = jax.ShapeDtypeStruct
  b, t, h, d, n, c, s = 1, 100, 2, 64, 5, 63, 70
  tok = lambda m: S((b, m, h, d), dtype)
  blk = S((b, n, c, h, d), dtype)
  specs = [tok(t), blk, blk, S((b, t, 1, n), jnp.float32), S((b, t, n), jnp.bool_), tok(s), tok(s),
           S((b, t, s), jnp.bool_), S((b, n, c), jnp.bool_)]
  fn = lambda q, bk, bv, g, al, kl, vl, ml, bm: fwd_fn(q, bk, bv, g, al, k=2, local=(kl, vl, ml),
                                                      blk_mask=bm, decode=decode)
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)
  fwd = _lower(fn, specs, platform)
  bwd = _lower(jax.grad(loss, argnums=(0, 1, 2, 3, 5, 6)), specs, platform)
  for txt in (fwd, bwd):
    assert KERNEL_CALL[platform] in set(re.findall(r"custom_call @([\w$.]+)", txt))
  name = "block_retrieval_attention_"
  forward = name + ("decode" if decode else "fwd")
  assert _kernel_names(fwd) == {forward}
  assert _kernel_names(bwd) == {forward} | {name + k for k in ("dq", "dkv_blocks", "dkv_local")}


# ----------------------------------------------------------------------------- titans memory (#9)

@pytest.mark.parametrize("D,E,dtype", [(64, 256, jnp.bfloat16), (64, 256, jnp.float32),
                                       (32, 128, jnp.float32)])
def test_titans_memory_lowers_forward_and_backward(D, E, dtype):
  """The per-chunk kernels at the Titans layer's shape (D = 64, E = 256, chunk 16, depth 2) and a
  smaller one, from a mid-stream state (T = 40 spans four chunks with the phase shift); CUDA only.
  The gradient runs the hand-written backward kernel at every size (125 KiB of shared memory at
  D = 64, E = 256, measured with scripts/triton_resources.py; the jax.vjp one needed 486 KiB)."""
  from pallas_kernels.titans_memory import titans_memory
  S = jax.ShapeDtypeStruct
  B, T, H = 1, 40, 2
  tok, gate = S((B, T, H, D), dtype), S((B, T, H), dtype)
  ws = tuple(S((B, H) + s, jnp.float32) for s in ((E, D), (D, E)))
  specs = [tok, tok, tok, S((B, T, H, 2), dtype), gate, gate, S((H, D), jnp.float32),
           S((H, D), jnp.float32), ws, ws, ws, S((B,), jnp.int32)]

  def f(q, k, v, theta, eta, log_a, ln_s, ln_b, w, s, wb, phase):
    st = {"w": w, "s": s, "w_base": wb, "phase": phase}
    return titans_memory(q, k, v, theta, eta, log_a, ln_s, ln_b, state=st, chunk_size=16,
                         implementation="pallas_gpu")

  def loss(*a):
    o, st = f(*a)
    return jnp.sum(o.astype(jnp.float32) ** 2) + sum(
        jnp.sum(x ** 2) for x in jax.tree.leaves((st["w"], st["s"])))

  fwd = _lower(f, specs, "cuda")
  bwd = _lower(jax.grad(loss, argnums=tuple(range(11))), specs, "cuda")
  for txt in (fwd, bwd):
    assert KERNEL_CALL["cuda"] in set(re.findall(r"custom_call @([\w$.]+)", txt))
  assert _kernel_names(fwd) == {"titans_memory_chunk_fwd"}
  assert _kernel_names(bwd) == {"titans_memory_chunk_fwd", "titans_memory_chunk_bwd"}
