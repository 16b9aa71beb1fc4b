"""Titans layers: reference (token loop) == chunked form in float64 for every variant, outputs and
gradients; bad input; short sequences; stability."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.titans import MAC, MAG, MAL, NeuralMemory, TitansConfig
from memarch.sharding import mesh_context

D, H, B = 16, 2, 2
CLASSES = {"lmm": NeuralMemory, "mac": MAC, "mag": MAG, "mal": MAL}


def build(variant, implementation, chunk, depth=2, dtype=jnp.float64):
  cfg = TitansConfig(D, H, memory_depth=depth, chunk_size=chunk, segment_len=max(8, chunk),
                     window=6, num_persistent=chunk if chunk > 1 else 2,
                     implementation=implementation)
  with mesh_context():
    m = CLASSES[variant](cfg, rngs=nnx.Rngs(0))
  # Promote parameters to float64 for an exact comparison.
  state = nnx.state(m)
  nnx.update(m, jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
  return m


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30)


# Each variant once, at a chunk that splits the sequence mid-chunk, two at chunk 4 and two at 16
# (each float64 backward is a long compile on CPU). Chunk sizes 1..16 of the op itself:
# test_titans_memory.py; MAC's segment grid against the chunks: test_conformance.py. MAG and MAL
# call the memory as the LMM does: theirs run with `-m slow`.
@pytest.mark.parametrize("variant,chunk,t", [
    ("lmm", 4, 11), ("mac", 16, 21), pytest.param("mag", 16, 21, marks=pytest.mark.slow),
    pytest.param("mal", 4, 11, marks=pytest.mark.slow)])
def test_reference_equals_chunked_float64(variant, chunk, t):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(1), (B, t, D), jnp.float64)
    outs, grads = {}, {}
    for impl in ("reference", "xla"):
      m = build(variant, impl, chunk)
      graphdef, params, rest = nnx.split(m, nnx.Param, ...)

      def loss(params, x):
        mod = nnx.merge(graphdef, params, rest)
        y, s = mod(x)
        return jnp.sum(jnp.sin(y)), (y, s)

      (l, (y, s)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
      outs[impl], grads[impl] = (y, s), g
    assert rel(outs["xla"][0], outs["reference"][0]) < 1e-9
    for a, b in zip(jax.tree.leaves(outs["xla"][1]), jax.tree.leaves(outs["reference"][1])):
      if jnp.issubdtype(a.dtype, jnp.floating):
        assert rel(a, b) < 1e-9
      else:
        np.testing.assert_array_equal(a, b)
    ga, gb = jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["reference"])
    assert len(ga) == len(gb) > 10
    for a, b in zip(ga, gb):
      assert rel(a, b) < 1e-8


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_given_initial_state_float64(variant):
  """Continuing from a mid-chunk, mid-segment state: reference == chunked."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(2), (B, 13, D), jnp.float64)
    ys = {}
    for impl in ("reference", "xla"):
      m = build(variant, impl, 4)
      call = jax.jit(lambda m, x, s: m(x, state=s))
      _, s = call(m, x[:, :6], None)
      ys[impl] = call(m, x[:, 6:], s)[0]
    assert rel(ys["xla"], ys["reference"]) < 1e-9


def test_linear_memory_depth1_runs_closed_form_and_learns_per_token():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(3), (B, 9, D), jnp.float64)
    call = jax.jit(lambda m, x: m(x)[0])
    y1 = call(build("lmm", "xla", 1, depth=1), x)
    y4 = call(build("lmm", "xla", 4, depth=1), x)
    # chunk size is part of the model: 1 (exact recurrence) and 4 (mini-batch) must differ
    assert rel(y4, y1) > 1e-6


def test_short_sequence_still_updates_memory():
  m = build("lmm", None, 16, dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 3, D))
  s0 = m.init_state(B)
  _, s1 = jax.jit(lambda m, x, s: m(x, state=s))(m, x, s0)
  dw = sum(float(jnp.abs(a - b).sum()) for a, b in zip(s1["mem"]["w"], s0["mem"]["w"]))
  assert dw > 1e-6
  assert int(s1["mem"]["phase"][0]) == (16 + 3) % 16  # persistent prefix (16) + 3 tokens


def test_extreme_inputs_stay_finite():
  """Bounded theta, L2-normalised keys and the LN inside the memory keep updates finite."""
  for variant in ("lmm", "mac"):
    m = build(variant, None, 4, dtype=jnp.float32)
    x = 1e4 * jax.random.normal(jax.random.PRNGKey(0), (B, 40, D))
    y, s = jax.jit(lambda m, x: m(x))(m, x)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(s))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(segment_len=20, chunk_size=16), "not a multiple of chunk_size"),
    (dict(memory_depth=0), "memory_depth must be >= 1"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(num_heads=3), "not divisible"),
])
def test_bad_config(kwargs, msg):
  base = dict(d_model=D, num_heads=H)
  base.update(kwargs)
  with pytest.raises(ValueError, match=msg):
    TitansConfig(**base)


def test_memory_statistics_are_sown():
  m = build("mac", None, 4, dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 12, D))
  from layers.base import Stat
  (_, _), stats = jax.jit(lambda m, x: nnx.capture(m, Stat)(x))(m, x)
  names = {str(p[-3].key) if hasattr(p[-3], "key") else "" for p, _ in
           jax.tree_util.tree_flatten_with_path(stats)[0]}
  flat = {"/".join(str(getattr(k, "key", "")) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(stats)[0]}
  keys = " ".join(flat)
  for name in ("surprise_norm", "theta_mean", "eta_mean", "decay_mean", "memory_weight_norm"):
    assert name in keys, (name, keys)
  assert all(np.isfinite(float(v)) for v in flat.values())
  del names
