"""DESIGN.md section 3 conformance, parameterised over every registered sequence mixer:
shapes, finite gradients, causality, split invariance (incl. one-token decode steps), and
state=None == init_state()."""
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


NAMES = sorted(registry.SEQUENCE_MIXERS)


def _close(a, b, tol=2e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-12)
  assert err < tol, f"relative RMS error {err:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite_grads(name):
  mixer = build(name)
  x = inputs()
  y, state = run(mixer, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert all(leaf.shape[0] == B for leaf in jax.tree.leaves(state)), "state leaves need batch first"
  graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

  def loss(params, x):
    m = nnx.merge(graphdef, params, rest)
    return jnp.sum(jnp.sin(m(x)[0]))

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
  # Off-chunk cuts, a cut on a chunk boundary, and one-token decode steps (few distinct lengths,
  # since every new length is a compile).
  for cuts in ([7], [8], [5, 6, 7]):
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


@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_do_not_leak(name):
  """With segment_ids, a packed row equals running its documents separately (or the mixer refuses
  packed input with a clear error instead of leaking memory across documents)."""
  mixer = build(name)
  x = inputs(2)
  cut = 8
  seg = jnp.concatenate([jnp.ones((B, cut), jnp.int32), 2 * jnp.ones((B, T - cut), jnp.int32)], 1)
  try:
    packed, _ = run_seg(mixer, x, seg)
  except NotImplementedError as e:
    assert "segment_ids" in str(e)
    return
  a, _ = run(mixer, x[:, :cut])
  b, _ = run(mixer, x[:, cut:])
  _close(packed, jnp.concatenate([a, b], axis=1))


@jax.jit
def run_seg(mixer, x, seg):
  return mixer(x, segment_ids_BT=seg)
