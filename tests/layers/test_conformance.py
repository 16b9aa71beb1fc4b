"""Sequence-mixer conformance (docs/design.md), parameterised over every registered mixer: shapes,
finite gradients, causality, split invariance (incl. one-token decode steps), state=None ==
init_state(), and packed documents computed as if each ran alone.

Compiling is most of the cost here (the Titans and Miras backward passes dominate the run on
CPU), so the tests reuse shapes: every unpacked forward from a fresh state runs at [B, T], and
all tests of one mixer run on one xdist worker (`xdist_group`, `--dist loadgroup`), where jit's
cache shares those programs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memarch import registry
from memarch.sharding import mesh_context

D, H, B, T = 16, 2, 2, 19

# Small per-mixer options so every entry runs in a second or two on CPU.
_MIRAS = {"chunk_size": 4, "num_persistent": 4, "expansion": 2}
_TITANS = {"chunk_size": 4, "segment_len": 8, "window": 6, "num_persistent": 4}
TINY_KWARGS = {
    "swa": {"window": 5},
    "gated_deltanet": {"chunk_size": 8},
    "mom": {"chunk_size": 8, "num_memories": 3, "top_k": 2},
    "landmark": {"block_size": 4},
    # zero_init_out=False: otherwise HCAM's memory path outputs zero at init and only its local
    # attention would be tested.
    "hcam": {"chunk_size": 4, "segment_len": 8, "zero_init_out": False},
    "moneta": _MIRAS, "yaad": _MIRAS, "memora": _MIRAS,
    "titans_lmm": _TITANS, "titans_mac": _TITANS, "titans_mag": _TITANS, "titans_mal": _TITANS,
}


def build(name):
  with mesh_context():
    return registry.build_mixer(name, rngs=nnx.Rngs(0), d_model=D, num_heads=H,
                                **TINY_KWARGS.get(name, {}))


def inputs(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D), jnp.float32)


@jax.jit
def _run_jit(mixer, x, state):
  return mixer(x, state=state)


def run(mixer, x, state=None):
  """Jitted (eager op-by-op execution of a recurrent layer is far slower than compiling it)."""
  return _run_jit(mixer, x, state)


NAMES = [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in sorted(registry.SEQUENCE_MIXERS)]


def _close(a, b, tol=2e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-12)
  assert err < tol, f"relative RMS error {err:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite_grads(name):
  """Shapes of an unpacked call; gradients through a packed row, the text-pretraining path (the
  unpacked gradients of every family are checked by tests/memarch/test_init_grad_norm.py)."""
  mixer = build(name)
  x = inputs()
  y, state = run(mixer, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert all(leaf.shape[0] == B for leaf in jax.tree.leaves(state)), "state leaves need batch first"
  graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
  seg, _ = packed_rows()

  def loss(params, x):
    m = nnx.merge(graphdef, params, rest)
    return jnp.sum(jnp.sin(m(x, segment_ids_BT=seg)[0]))

  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  leaves = jax.tree.leaves(g_params)
  assert leaves and all(bool(jnp.all(jnp.isfinite(l))) for l in leaves)
  assert sum(float(jnp.sum(jnp.abs(l))) for l in leaves) > 0
  assert bool(jnp.all(jnp.isfinite(g_x))) and float(jnp.abs(g_x).sum()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
  mixer = build(name)
  x = inputs()
  j = 11
  y0, _ = run(mixer, x)
  y1, _ = run(mixer, x.at[:, j].add(3.0))
  np.testing.assert_allclose(y0[:, :j], y1[:, :j], atol=1e-5)
  assert float(jnp.abs(y0[:, j:] - y1[:, j:]).max()) > 1e-4, "output ignores its own input"


@pytest.mark.parametrize("name", NAMES)
def test_split_invariance(name):
  mixer = build(name)
  x = inputs(1)
  full, full_state = run(mixer, x, mixer.init_state(B, max_len=T))
  none_y, _ = run(mixer, x)
  _close(none_y, full)
  step = _run_jit
  # A cut on a chunk, segment and block boundary (8), two one-token decode steps, then a cut inside
  # a chunk and segment (10) and a piece across the next boundaries (few distinct lengths, since
  # every new length is a compile).
  for cuts in ([8, 9, 10],):
    state = mixer.init_state(B, max_len=T)
    outs, prev = [], 0
    for c in cuts + [T]:
      y, state = step(mixer, x[:, prev:c], state)
      outs.append(y)
      prev = c
    _close(jnp.concatenate(outs, axis=1), full)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(full_state)):
      if jnp.issubdtype(a.dtype, jnp.floating):
        _close(a, b)
      else:
        np.testing.assert_array_equal(a, b)


# Packed rows: documents of lengths 5, 5, 1, 8 and 1, 8, 5, 5 (cuts at 5, 10, 11 and 1, 9, 14: none
# a multiple of any chunk, segment or block size above, two one-token documents).
DOC_LENGTHS = ([5, 5, 1, 8], [1, 8, 5, 5])


def packed_rows():
  """(segment_ids [B, T], [(row, start, length)] of every document)."""
  seg = np.zeros((B, T), np.int32)
  docs = []
  for row, lengths in enumerate(DOC_LENGTHS):
    start = 0
    for i, n in enumerate(lengths):
      seg[row, start:start + n] = i + 1
      docs.append((row, start, n))
      start += n
  return jnp.asarray(seg), docs


@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_run_as_if_alone(name):
  """With segment_ids, every document of a packed row gives the outputs it gives alone from the
  initial state: no memory, attention or chunk grid crosses a boundary. A document alone runs at
  the start of a zero-padded [B, T] row (the padding after it cannot change its outputs: causality
  is tested above), B documents per call, so all calls share one compiled program."""
  mixer = build(name)
  x = inputs(2)
  seg, docs = packed_rows()
  packed, _ = run_seg(mixer, x, seg)
  for i in range(0, len(docs), B):
    group = docs[i:i + B]
    rows = jnp.zeros_like(x)
    for j, (r, s, n) in enumerate(group):
      rows = rows.at[j, :n].set(x[r, s:s + n])
    alone, _ = run(mixer, rows)
    for j, (r, s, n) in enumerate(group):
      _close(packed[r, s:s + n], alone[j, :n])


@jax.jit
def run_seg(mixer, x, seg):
  return mixer(x, segment_ids_BT=seg)
