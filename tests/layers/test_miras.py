"""Miras layer (Moneta, Yaad, Memora): the layer with the xla memory equals the layer with the
token-loop oracle (float64), persistent tokens warm the state, decode equals the parallel pass, and
the config validates. The generic checks (causality, split invariance, finite grads) run in
tests/layers/test_conformance.py under the registered names moneta, yaad, memora."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers.miras import Miras, MirasConfig
from memarch.sharding import mesh_context
from pallas_kernels.testing import assert_close, assert_tree_close, rel_rms

D, H, B, T = 8, 2, 2, 7


def build(model, **kw):
  kw = {"chunk_size": 4, "expansion": 2, **kw}
  with mesh_context():
    return Miras(MirasConfig(D, H, model=model, **kw), rngs=nnx.Rngs(0))


def x_in(seed=0, t=T, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, t, D), jnp.float32).astype(dtype)


@jax.jit
def apply(m, x, state):
  return m(x, state=state)


@pytest.mark.parametrize("model", ["moneta", "yaad", "memora"])
def test_xla_layer_equals_reference_layer_x64(x64, model):
  if True:
    m = build(model, num_persistent=4)
    m64 = jax.tree.map(lambda p: p.astype(jnp.float64), nnx.state(m))
    outs = {}
    for impl in ("reference", "xla"):
      mi = build(model, num_persistent=4, implementation=impl)
      nnx.update(mi, m64)
      x = x_in(1, dtype=jnp.float64)
      outs[impl] = jax.jit(lambda mm, x: mm(x))(mi, x)
    assert outs["xla"][0].dtype == jnp.float64
    assert_close(outs["xla"][0], outs["reference"][0], 1e-9, "y")
    assert_tree_close(outs["xla"][1], outs["reference"][1], 1e-9, "state")


def test_models_differ_and_state_keys():
  x = x_in(2)
  ys, keys = {}, {}
  for model in ("moneta", "yaad", "memora"):
    m = build(model)
    ys[model], st = apply(m, x, m.init_state(B))
    keys[model] = sorted(st["mem"])
    assert bool(jnp.all(jnp.isfinite(ys[model])))
  assert keys == {"moneta": ["a", "base", "base_decay", "phase"],
                  "yaad": ["base", "base_decay", "phase", "w"],
                  "memora": ["base", "base_decay", "phase", "z"]}
  assert rel_rms(ys["moneta"], ys["yaad"]) > 1e-3 and rel_rms(ys["memora"], ys["yaad"]) > 1e-3


def test_persistent_tokens_and_decode():
  """With persistent tokens the initial state differs from the learned x0 (P was written), and
  token-by-token decoding equals the parallel pass."""
  m = build("moneta", num_persistent=4)
  st0 = m.init_state(B)
  assert rel_rms(st0["mem"]["a"][0][0], m.w0[0][...]) > 1e-4
  x = x_in(3)
  y_full, s_full = apply(m, x, st0)
  y_none, _ = m(x)
  assert_close(y_none, y_full, 1e-5, "state=None")
  state, ys = st0, []
  for t in range(T):
    y, state = apply(m, x[:, t:t + 1], state)
    ys.append(y)
  assert_close(jnp.concatenate(ys, 1), y_full, 1e-4, "decode")
  assert_tree_close(state, s_full, 1e-4, "decode state")


def test_bfloat16_input_keeps_float32_state():
  m = build("yaad")
  y, st = m(x_in(4, dtype=jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and st["mem"]["w"][0].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_config_errors():
  with pytest.raises(ValueError, match="unknown model"):
    MirasConfig(8, 2, model="titans")
  with pytest.raises(ValueError, match="divisible"):
    MirasConfig(9, 2)
  with pytest.raises(ValueError, match="kl_scale_init must be > 0"):
    MirasConfig(8, 2, model="memora", kl_scale_init=0.0)
  assert bool(jnp.all(build("memora", kl_scale_init=3.0).kl_scale[...] == 3.0))
  with pytest.raises(ValueError, match="kl_logit_std must be > 0"):
    MirasConfig(8, 2, model="memora", kl_logit_std=-1.0)
  z_std = lambda layer: float(jnp.std(jnp.concatenate([w[...].ravel() for w in layer.w0])))
  one, half = z_std(build("memora")), z_std(build("memora", kl_logit_std=0.5))
  assert 0.9 < one < 1.1 and abs(half / one - 0.5) < 1e-6, (one, half)
  with pytest.raises(ValueError, match="theta_init"):
    MirasConfig(8, 2, theta_init=1.0)
  # theta starts at theta_init * theta_max (W_theta is small: within a few % of it)
  for frac in (0.5, 0.25):
    layer = build("memora", theta_max=0.04, theta_init=frac)
    theta = layer.project(x_in(), layer.init_state(B))[3]
    assert abs(float(jnp.mean(theta)) / (frac * 0.04) - 1) < 0.05, (frac, float(jnp.mean(theta)))
  # packed rows need the post-persistent state on a chunk boundary
  with pytest.raises(ValueError, match="multiple of chunk_size"):
    build("memora", num_persistent=3)(x_in(), segment_ids_BT=jnp.ones((B, T), jnp.int32))


def test_write_gain_probe():
  """The write-gain probe: exactly 1 for the linear identity-phi memory (unit keys, 1/2||e||^2:
  a write of theta removes theta e), ~1.1 head_dim for the LN'd MLP memory at init, the same inside
  a chunk as at its end for an identity phi; the KL and l_4 maps' linearised reads, through
  rules.MemoryRule.read_map, move as their chunk-end reads do (with the weight-space update the KL
  read moved ~140x more at head dim 32, the l_4 read 1.7x less; docs/architectures/miras.md)."""
  from layers.miras import write_gain
  assert abs(write_gain("l2", 4.0, 8, 4, 1) - 1.0) < 1e-4
  g = write_gain("l2", 4.0, 16, 4, 2)
  assert 0.8 * 16 < g < 1.4 * 16, g
  assert write_gain("l2", 4.0, 16, 4, 2, linearised=True) == pytest.approx(g, rel=1e-5)
  for d in (32, 64):
    for retention in ("kl", "lq"):
      assert write_gain(retention, 4.0, d, 4, 2, linearised=True) == pytest.approx(
          write_gain(retention, 4.0, d, 4, 2), rel=0.05), (retention, d)
  assert MirasConfig(32, 2, model="moneta").theta_cap == pytest.approx(0.3 / 16)
  assert MirasConfig(32, 2, model="moneta", theta_max=0.5).theta_cap == 0.5


def test_binding_probe():
  """The inner-loop binding probe: with an identity phi (Yaad) the read inside the writes' chunk
  and after its end agree, and at the Titans cap 4 fresh pairs bind (~0.96); Memora binds less at
  the same cap and fully at 4x it; Moneta binds at the cap, and at 16x its chunk-end read binds
  far worse than its linearised in-chunk read (docs/architectures/miras.md, "Initial states")."""
  from layers.miras import binding_probe
  with pytest.raises(ValueError, match="unknown model 'titans'"):
    binding_probe("titans", 1.0)
  yaad = binding_probe("yaad", 1.0, trials=64)
  assert yaad["in_chunk"] == pytest.approx(yaad["after_end"], abs=1e-5)
  assert yaad["after_end"][0] > 0.9 and 0.6 < yaad["after_end"][1] < 0.8, yaad
  memora1, memora4 = binding_probe("memora", 1.0, trials=64), binding_probe("memora", 4.0, trials=64)
  assert memora1["after_end"][0] < 0.75 < 0.95 < memora4["after_end"][0], (memora1, memora4)
  moneta1, moneta16 = binding_probe("moneta", 1.0, trials=64), binding_probe("moneta", 16.0, trials=64)
  assert moneta1["after_end"][0] > 0.9, moneta1
  assert moneta16["after_end"][0] < moneta16["in_chunk"][0] - 0.2, moneta16
