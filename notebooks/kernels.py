# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # memarch kernels side by side
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memarch/memarch/blob/main/notebooks/kernels.ipynb)
#
# Every recurrence and memory read in memarch is a kernel op in `pallas_kernels/` with one
# signature and several implementations:
#
# - `reference`: a token-by-token `lax.scan` (or a dense naive form), the oracle;
# - `xla`: the chunked form, portable and autodiff-able, the default on CPU and the fallback
#   everywhere;
# - `pallas_gpu` / `pallas_tpu`: Pallas kernels where written. On a CPU they run in **interpret
#   mode**, which checks their logic but says nothing about their speed; on a GPU (Colab: Runtime >
#   Change runtime type) `pallas_gpu` runs natively.
#
# For each op this notebook runs every implementation on the same random inputs and reports the
# relative RMS error of the outputs (and of the gradients) against `reference`, and the time of a
# jitted forward call. `MEMARCH_NOTEBOOK_FAST=1` shrinks the shapes (how CI runs it).

# %% [markdown]
# ## Install
#
# In Colab this installs memarch from GitHub; where memarch is already importable the cell does
# nothing.

# %%
import importlib.util

if importlib.util.find_spec("memarch") is None:
  # !pip install -q "git+https://github.com/memarch/memarch"
  importlib.invalidate_caches()

# %%
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch
from pallas_kernels.testing import grads_of, rel_rms

FAST = os.environ.get("MEMARCH_NOTEBOOK_FAST") == "1"
BACKEND = jax.default_backend()
REPEATS = 2 if FAST else 20
rng = np.random.default_rng(0)
print(f"jax {jax.__version__} on {BACKEND}: {jax.devices()[0].device_kind}; "
      f"implementation=None tries {_dispatch.default_order()}; fast mode: {FAST}")

# %% [markdown]
# ## The comparison harness
#
# `compare` takes `run(implementation, interpret, *args)` returning the op's outputs and prints one
# row per implementation. A Pallas kernel for another kind of accelerator is skipped; one that
# cannot run here (an old GPU, an unsupported shape) is reported with its reason instead of
# stopping the notebook. The last row is `implementation=None`, what the layers use.

# %%
NATIVE = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(BACKEND)


def interpret_flag(impl):
  """False: run natively; True: Pallas interpret mode (CPU); None: another accelerator's kernel."""
  if not impl.startswith("pallas") or impl == NATIVE:
    return False
  return True if BACKEND == "cpu" else None


def timed(f, *args):
  jax.block_until_ready(f(*args))  # compile outside the timing
  ts = []
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(ts))


def compare(name, run, args, impls, grad_argnums):
  ref_fn = lambda *a: run("reference", False, *a)
  ref = jax.jit(ref_fn)(*args)
  g_ref = jax.jit(lambda *a: grads_of(ref_fn, a, grad_argnums))(*args)
  print(f"{name}: {'implementation':22s} {'out err':>9s} {'grad err':>9s} {'fwd ms':>9s}")
  rows = {}
  for impl in list(impls) + [None]:
    interpret = False if impl is None else interpret_flag(impl)
    label = "None -> best" if impl is None else impl + (" (interpret)" if interpret else "")
    if interpret is None:
      print(f"{'':{len(name)}s}  {label:22s} skipped: not a {BACKEND} kernel")
      continue
    fn = jax.jit(lambda *a, impl=impl, interpret=interpret: run(impl, interpret, *a))
    try:
      ms = timed(fn, *args)
      out = fn(*args)
      # None runs one of the rows above; its gradients would only cost another compile.
      grads = None if impl is None else jax.jit(lambda *a: grads_of(fn, a, grad_argnums))(*args)
    except Exception as e:  # noqa: BLE001 - report and go on: this is a tour, not a test
      print(f"{'':{len(name)}s}  {label:22s} unavailable: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:90]}")
      continue
    err = max(rel_rms(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    g_err = grads and max(rel_rms(o, r) for o, r in zip(jax.tree.leaves(grads),
                                                        jax.tree.leaves(g_ref)))
    rows[label] = dict(err=err, grad_err=g_err, ms=ms)
    g_txt = "-" if g_err is None else f"{g_err:.2e}"
    print(f"{'':{len(name)}s}  {label:22s} {err:9.2e} {g_txt:>9s} {ms:9.3f}")
  return rows


# %% [markdown]
# ## Gated delta rule (Gated DeltaNet, MoM)
#
# `S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T`, `o_t = S_t^T q_t / sqrt(K)`:
# inputs `[B, T, H, D]`, a float32 matrix state `[B, H, K, V]`.

# %%
from pallas_kernels import gated_delta_rule

B, T, H, K, V = (1, 32, 1, 16, 16) if FAST else (2, 512, 4, 64, 64)
CHUNK = 16 if FAST else 64


def l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


q, k = (jnp.asarray(l2(rng.standard_normal((B, T, H, K))), jnp.float32) for _ in range(2))
v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
beta = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32))
g = jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((B, T, H)) + 3.0, jnp.float32))
h0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)

gdr = compare(
    "gated_delta_rule",
    lambda impl, interp, *a: gated_delta_rule(*a[:5], initial_state=a[5], chunk_size=CHUNK,
                                              implementation=impl, interpret=interp),
    (q, k, v, beta, g, h0), ["reference", "xla", "pallas_gpu", "pallas_tpu"], range(6))

# %% [markdown]
# ### Falling back to XLA
#
# A Pallas path that cannot handle its inputs raises `NotImplementedError` with the reason. Asked for
# by name, that error reaches you; with `implementation=None` dispatch moves on to `xla`. Here the
# kernel refuses a chunk size that is not a power of two:

# %%
try:
  gated_delta_rule(q, k, v, beta, g, chunk_size=24, implementation="pallas_gpu", interpret=True)
except NotImplementedError as e:
  print("pallas_gpu, explicit:", e)
o_default, _ = gated_delta_rule(q, k, v, beta, g, chunk_size=24)
o_xla, _ = gated_delta_rule(q, k, v, beta, g, chunk_size=24, implementation="xla")
print(f"implementation=None still works on {BACKEND}: max |None - xla| = "
      f"{float(jnp.max(jnp.abs(o_default - o_xla))):.1e}")

# %% [markdown]
# ## (Gated) linear attention
#
# `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t / sqrt(K)`; `g=None` is plain linear
# attention.

# %%
from pallas_kernels import linear_attention

la = compare(
    "linear_attention",
    lambda impl, interp, *a: linear_attention(*a[:4], initial_state=a[4], chunk_size=CHUNK,
                                              implementation=impl, interpret=interp),
    (q, k, v, g, h0), ["reference", "xla", "pallas_gpu", "pallas_tpu"], range(5))

# %% [markdown]
# ## Titans neural memory
#
# Per token and head, a 2-layer MLP memory takes a gradient step on `1/2 ||M(k_t) - v_t||^2` with
# momentum and decay, then is read with `q_t` (Titans Eq. 13-15, chunked with chunk-start gradients).
# The state holds the memory weights, the momentum and the chunk phase.

# %%
from pallas_kernels.titans_memory import init_memory_state, titans_memory

TM, E, L = (16, 2, 2) if FAST else (256, 4, 2)
D = 16 if FAST else 32
qm, km = (jnp.asarray(l2(rng.standard_normal((B, TM, H, D))), jnp.float32) for _ in range(2))
vm = jnp.asarray(rng.standard_normal((B, TM, H, D)), jnp.float32)
theta = jnp.asarray(0.1 * rng.uniform(size=(B, TM, H, L)), jnp.float32)
eta = jnp.asarray(0.9 * rng.uniform(size=(B, TM, H)), jnp.float32)
log_a = jnp.asarray(-0.05 * rng.uniform(size=(B, TM, H)), jnp.float32)
ln_scale, ln_bias = jnp.ones((H, D)), jnp.zeros((H, D))
w0 = (jnp.asarray(rng.standard_normal((H, E * D, D)) / np.sqrt(D), jnp.float32),
      jnp.asarray(rng.standard_normal((H, D, E * D)) / np.sqrt(E * D), jnp.float32))
mem_state = init_memory_state(w0, B)

tm = compare(
    "titans_memory",
    lambda impl, interp, *a: titans_memory(*a[:8], state=a[8], chunk_size=8 if FAST else 16,
                                           implementation=impl, interpret=interp),
    (qm, km, vm, theta, eta, log_a, ln_scale, ln_bias, mem_state), ["reference", "xla"], range(6))

# %% [markdown]
# ## Expert gather (PEER, PKM, UltraMemV2)
#
# Product-key layers read a weighted sum of a few rows of a huge table. `expert_gather` is the PKM
# read `sum_k w_k table[i_k]`; `expert_mlp` the PEER read `sum_k w_k gelu(down[i_k] . x) up[i_k]`.
# The `xla` path's custom VJP gets the table gradients by sorting the indices and a segment sum
# instead of a dense scatter.

# %%
from pallas_kernels.expert_gather import expert_gather, expert_mlp

N, DE, TOK, TOPK = (256, 16, 32, 4) if FAST else (65536, 64, 1024, 16)
table = jnp.asarray(rng.standard_normal((N, DE)), jnp.float32)
up = jnp.asarray(rng.standard_normal((N, DE)), jnp.float32)
x_e = jnp.asarray(rng.standard_normal((TOK, DE)), jnp.float32)
idx = jnp.asarray(rng.integers(0, N, (TOK, TOPK)), jnp.int32)
w_e = jax.nn.softmax(jnp.asarray(rng.standard_normal((TOK, TOPK)), jnp.float32))

eg = compare("expert_gather",
             lambda impl, interp, t, w: expert_gather(t, idx, w, implementation=impl,
                                                      interpret=interp),
             (table, w_e), ["reference", "xla"], (0, 1))
em = compare("expert_mlp",
             lambda impl, interp, x, dn, u, w: expert_mlp(x, dn, u, idx, w, implementation=impl,
                                                          interpret=interp),
             (x_e, table, up, w_e), ["reference", "xla"], range(4))

# %% [markdown]
# ## Block-retrieval attention (landmark attention, HCAM)
#
# Each query attends to its local keys plus the top-k of N key blocks chosen by a gate score, each
# retrieved block weighted by its gate (landmark attention's grouped softmax, HCAM's chunk
# attention).

# %%
from pallas_kernels.block_retrieval_attention import block_retrieval_attention

TQ, NB, C, S, DH, TOPB = (8, 6, 4, 8, 8, 2) if FAST else (128, 32, 32, 128, 32, 4)
q_b = jnp.asarray(rng.standard_normal((B, TQ, H, DH)), jnp.float32)
blk_k, blk_v = (jnp.asarray(rng.standard_normal((B, NB, C, H, DH)), jnp.float32) for _ in range(2))
gate = jnp.asarray(rng.standard_normal((B, TQ, H, NB)), jnp.float32)
allowed = jnp.asarray(rng.random((B, TQ, NB)) < 0.8)
local = (jnp.asarray(rng.standard_normal((B, S, H, DH)), jnp.float32),
         jnp.asarray(rng.standard_normal((B, S, H, DH)), jnp.float32),
         jnp.asarray(np.tril(np.ones((TQ, S), bool), S - TQ)[None].repeat(B, 0)))

bra = compare(
    "block_retrieval_attention",
    lambda impl, interp, *a: block_retrieval_attention(*a, allowed, k=TOPB, local=local,
                                                       implementation=impl, interpret=interp),
    (q_b, blk_k, blk_v, gate), ["reference", "xla"], range(4))

# %% [markdown]
# ## Summary
#
# Every implementation should agree with `reference` to float32 rounding (relative RMS error around
# 1e-6, gradients a little more); the same checks, over many more shapes, dtypes and initial
# states, run in `tests/pallas_kernels/`. For real GPU timings use `scripts/bench.py` on the GPU.

# %%
import matplotlib.pyplot as plt

summary = {"gated_delta_rule": gdr, "linear_attention": la, "titans_memory": tm,
           "expert_gather": eg, "expert_mlp": em, "block_retrieval_attention": bra}
worst = max(r["err"] for rows in summary.values() for r in rows.values())
print(f"largest output error against reference across all ops and paths: {worst:.1e}")
assert worst < 1e-3, worst

fig, ax = plt.subplots(figsize=(10, 3.2))
labels, times = [], []
for op, rows in summary.items():
  for impl, r in rows.items():
    if "interpret" not in impl:
      labels.append(f"{op}\n{impl}"); times.append(r["ms"])
ax.bar(range(len(times)), times)
ax.set_xticks(range(len(times)), labels, rotation=90, fontsize=7)
ax.set(ylabel="forward ms (median)", yscale="log", title=f"jitted forward time on {BACKEND}")
plt.tight_layout(); plt.show()
