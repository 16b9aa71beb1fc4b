"""Packed documents in the memory engine (Titans and Miras), float64: the oracle with resets at any
token equals each document run alone, and the chunked path on documents moved to chunk starts
(`layers.packing`) equals the oracle, outputs, final state and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.packing import from_slots, realign, to_slots
from pallas_kernels.miras_memory import MODELS, init_miras_state, miras_memory
from pallas_kernels.testing import assert_close, assert_tree_close
from pallas_kernels.titans_memory import init_memory_state, titans_memory

TOL = 1e-9
B, T, H, D, E, CHUNK = 2, 19, 2, 3, 2, 4
# Row 0: four documents, cut at 5, 11, 12 (a one-token document); row 1: cuts at 2 and 9.
CUTS = ([5, 11, 12], [2, 9])


def segments():
  seg = np.zeros((B, T), np.int32)
  for row, cuts in enumerate(CUTS):
    for c in cuts:
      seg[row, c:] += 1
  return jnp.asarray(seg)


def make_inputs(seed):
  rng = np.random.default_rng(seed)
  l2 = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  f = lambda *s: jnp.asarray(rng.standard_normal(s))
  q, k = (jnp.asarray(l2(rng.standard_normal((B, T, H, D)))) for _ in range(2))
  gates = {"v": f(B, T, H, D), "theta": jnp.asarray(0.4 * rng.uniform(size=(B, T, H, 2))),
           "eta": jnp.asarray(0.9 * rng.uniform(size=(B, T, H))),
           "a": jnp.asarray(1.0 - 0.2 * rng.uniform(size=(B, T, H))),
           "delta": jnp.asarray(rng.uniform(0.3, 2.5, size=(B, T, H))),
           "ln_s": 1.0 + 0.2 * f(H, D), "ln_b": 0.2 * f(H, D)}
  x0 = (f(H, E * D, D) / np.sqrt(D), f(H, D, E * D) / np.sqrt(E * D))
  return q, k, gates, x0


def call(model, q, k, g, x0, *, impl, state=None, resets=None, lengths=None):
  """One memory call (fresh state unless given); Titans takes the momentum rule."""
  b = q.shape[0]
  if model == "titans":
    fresh = init_memory_state(x0, b)
    return titans_memory(q, k, g["v"], g["theta"], g["eta"], jnp.log(g["a"]), g["ln_s"], g["ln_b"],
                         state=fresh if state is None else state, chunk_size=CHUNK,
                         implementation=impl, resets_BT=resets, lengths=lengths,
                         reset_state=None if resets is None else fresh)
  bias, ret = MODELS[model]
  fresh = init_miras_state(x0, b, ret)
  return miras_memory(q, k, g["v"], g["theta"], g["a"], g["delta"], g["ln_s"], g["ln_b"],
                      state=fresh if state is None else state, bias=bias, retention=ret,
                      lag_token=model == "memora", chunk_size=CHUNK, implementation=impl,
                      lengths=lengths,
                      resets_BT=resets, reset_state=None if resets is None else fresh)


def slice_inputs(q, k, g, row, lo, hi):
  cut = lambda x: x[row:row + 1, lo:hi] if x.ndim >= 3 else x
  return cut(q), cut(k), {n: cut(x) for n, x in g.items()}


@functools.partial(jax.jit, static_argnames=("model",))
def packed_xla(model, q, k, g, x0, seg):
  """The chunked path on realigned documents, outputs gathered back to the packed row."""
  r = realign(seg, CHUNK)
  slot = lambda x: to_slots(x, r) if x.ndim >= 3 else x
  g_s = {n: slot(x) for n, x in g.items()}
  g_s["a"] = jnp.where(r.valid_BS[..., None], g_s["a"], 1.0)  # padding slots: any finite gates
  o, st = call(model, slot(q), slot(k), g_s, x0, impl="xla", resets=r.starts_BS,
               lengths=r.lengths_B)
  return from_slots(o, r), st


ENGINES = ["titans"] + sorted(MODELS)


@pytest.mark.parametrize("model", ENGINES)
def test_reference_resets_equal_documents_alone(x64, model):
  q, k, g, x0 = make_inputs(0)
  seg = segments()
  from layers.packing import document_starts
  o, _ = jax.jit(functools.partial(call, model, impl="reference"))(
      q, k, g, x0, resets=document_starts(seg))
  alone = jax.jit(functools.partial(call, model, impl="reference"))
  for row, cuts in enumerate(CUTS):
    bounds = [0] + cuts + [T]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      o_doc, _ = alone(*slice_inputs(q, k, g, row, lo, hi), x0)
      assert_close(o[row:row + 1, lo:hi], o_doc, TOL, f"row {row} doc [{lo}, {hi})")


@pytest.mark.parametrize("model", ENGINES)
def test_chunked_realigned_equals_reference(x64, model):
  """Resets inside a chunk of the packed row: the oracle resets mid-chunk, the chunked path runs
  every document from a chunk start; outputs and final states agree."""
  from layers.packing import document_starts
  q, k, g, x0 = make_inputs(1)
  seg = segments()
  o_ref, st_ref = jax.jit(functools.partial(call, model, impl="reference"))(
      q, k, g, x0, resets=document_starts(seg))
  o_xla, st_xla = packed_xla(model, q, k, g, x0, seg)
  assert_close(o_xla, o_ref, TOL, "o")
  # the final state: of the last document; its phase counts from that document's start
  assert_tree_close({n: v for n, v in st_xla.items() if n != "phase"},
                    {n: v for n, v in st_ref.items() if n != "phase"}, TOL, "state")
  np.testing.assert_array_equal(st_xla["phase"], st_ref["phase"])


@pytest.mark.parametrize("model", ["titans", "memora"])
def test_chunked_realigned_gradients(x64, model):
  from layers.packing import document_starts
  q, k, g, x0 = make_inputs(2)
  seg = segments()

  def loss_ref(q, k, g, x0):
    return jnp.sum(jnp.sin(call(model, q, k, g, x0, impl="reference",
                                resets=document_starts(seg))[0]))

  def loss_xla(q, k, g, x0):
    return jnp.sum(jnp.sin(packed_xla(model, q, k, g, x0, seg)[0]))

  g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3)))(q, k, g, x0)
  g_xla = jax.jit(jax.grad(loss_xla, argnums=(0, 1, 2, 3)))(q, k, g, x0)
  assert_tree_close(g_xla, g_ref, TOL, "grads")
  assert float(jnp.abs(g_ref[3][0]).sum()) > 1e-6   # W_0 gets gradients from every document


def test_misplaced_reset_is_nan_not_wrong(x64):
  q, k, g, x0 = make_inputs(3)
  resets = jnp.zeros((B, T), bool).at[:, 6].set(True)     # 6 is not a multiple of the chunk
  o, _ = jax.jit(functools.partial(call, "titans", impl="xla"))(q, k, g, x0, resets=resets)
  assert bool(jnp.all(jnp.isnan(o)))
  ok = jnp.zeros((B, T), bool).at[:, 8].set(True)
  o, _ = jax.jit(functools.partial(call, "titans", impl="xla"))(q, k, g, x0, resets=ok)
  assert bool(jnp.all(jnp.isfinite(o)))


def test_reset_errors():
  q, k, g, x0 = make_inputs(4)
  with pytest.raises(ValueError, match="resets must be bool"):
    call("titans", q, k, g, x0, impl="xla", resets=jnp.zeros((B, T), jnp.int32))
  with pytest.raises(ValueError, match="reset_state"):
    titans_memory(q, k, g["v"], g["theta"], g["eta"], jnp.log(g["a"]), g["ln_s"], g["ln_b"],
                  state=init_memory_state(x0, B), chunk_size=CHUNK,
                  resets_BT=jnp.zeros((B, T), bool))
