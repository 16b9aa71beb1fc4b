"""Optimizer: weight decay reaches matrices but not vectors, and neither per-head gains (`Gain`)
nor learned initial memory states (`MemoryInit`) unless the config asks."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.base import Gain, MemoryInit
from memarch.optim import OptConfig, make_optimizer


class Tiny(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones((2, 3)))
    self.b = nnx.Param(jnp.ones((3,)))
    self.w0 = nnx.List([MemoryInit(jnp.ones((2, 2, 2)))])
    self.g = Gain(jnp.ones((2, 3)))  # a [heads, head_dim] norm scale: matrix-shaped, not a matrix


def one_step_with_zero_grads(decay_memory_init: bool, jit: bool, decay_gains: bool = False):
  """One AdamW step with zero gradients: only decayed leaves move (by lr * wd)."""
  model = Tiny()
  cfg = OptConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant",
                  decay_memory_init=decay_memory_init, decay_gains=decay_gains)
  opt = nnx.Optimizer(model, make_optimizer(cfg, 10, model), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  def step(state):
    model, opt = nnx.merge(graphdef, state)
    opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    return nnx.state((model, opt))

  state = (jax.jit(step) if jit else step)(state)
  model, _ = nnx.merge(graphdef, state)
  return {n: float(np.asarray(v).ravel()[0]) for n, v in
          (("w", model.w[...]), ("b", model.b[...]), ("w0", model.w0[0][...]),
           ("g", model.g[...]))}


def test_memory_init_states_skip_weight_decay():
  for jit in (False, True):
    moved = one_step_with_zero_grads(False, jit)
    assert abs(moved["w"] - 0.95) < 1e-6, moved      # 1 - lr * wd
    assert moved["b"] == 1.0 and moved["w0"] == 1.0 and moved["g"] == 1.0, moved
  moved = one_step_with_zero_grads(True, True)
  assert abs(moved["w0"] - 0.95) < 1e-6 and moved["g"] == 1.0, moved
  moved = one_step_with_zero_grads(False, True, decay_gains=True)  # the default config
  assert abs(moved["g"] - 0.95) < 1e-6 and moved["w0"] == 1.0, moved
  assert OptConfig().decay_gains


def test_memory_layers_mark_their_per_head_gains():
  """The Titans and Miras memories' [heads, ...] norm scales, biases and Memora's c are `Gain`s, and
  UltraMem's query scale."""
  from layers.miras import Miras, MirasConfig
  from layers.titans import NeuralMemory, TitansConfig
  from layers.ultramem import UltraMem, UltraMemConfig
  from memarch.optim import paths_of
  from memarch.sharding import mesh_context
  names = lambda m: sorted(p[-1].key for p in paths_of(m, Gain))
  with mesh_context():
    titans = NeuralMemory(TitansConfig(64, 2), rngs=nnx.Rngs(0))
    memora = Miras(MirasConfig(64, 2, model="memora"), rngs=nnx.Rngs(0))
    ultramem = UltraMem(UltraMemConfig(16, num_subkeys=4, top_m=4), rngs=nnx.Rngs(0))
  assert names(titans) == ["ln_bias", "ln_scale", "out_norm_scale"]
  assert names(memora) == ["kl_scale", "ln_bias", "ln_scale", "out_norm_scale"]
  assert names(ultramem) == ["q_scale"]
