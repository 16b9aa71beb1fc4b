"""Optimizer: weight decay reaches matrices but not vectors, and not learned initial memory states
(`MemoryInit`) unless the config asks."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.base import MemoryInit
from memarch.optim import OptConfig, make_optimizer


class Tiny(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones((2, 3)))
    self.b = nnx.Param(jnp.ones((3,)))
    self.w0 = nnx.List([MemoryInit(jnp.ones((2, 2, 2)))])


def one_step_with_zero_grads(decay_memory_init: bool, jit: bool):
  """One AdamW step with zero gradients: only decayed leaves move (by lr * wd)."""
  model = Tiny()
  cfg = OptConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant",
                  decay_memory_init=decay_memory_init)
  opt = nnx.Optimizer(model, make_optimizer(cfg, 10, model), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  def step(state):
    model, opt = nnx.merge(graphdef, state)
    opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    return nnx.state((model, opt))

  state = (jax.jit(step) if jit else step)(state)
  model, _ = nnx.merge(graphdef, state)
  return {n: float(np.asarray(v).ravel()[0]) for n, v in
          (("w", model.w[...]), ("b", model.b[...]), ("w0", model.w0[0][...]))}


def test_memory_init_states_skip_weight_decay():
  for jit in (False, True):
    moved = one_step_with_zero_grads(False, jit)
    assert abs(moved["w"] - 0.95) < 1e-6, moved      # 1 - lr * wd
    assert moved["b"] == 1.0 and moved["w0"] == 1.0, moved
  moved = one_step_with_zero_grads(True, True)
  assert abs(moved["w0"] - 0.95) < 1e-6, moved
