"""memarch.profiling: XLA ops attributed to the source lines and phases that produced them."""
import jax
import jax.numpy as jnp
import pytest

from memarch.profiling import CompiledStep, op_breakdown, op_sources


def _loss(w, x):
  h = jnp.tanh(x @ w)          # the forward line the profile must name
  return jnp.sum(h * h)


def _step(state, batch):
  loss, g = jax.value_and_grad(_loss)(state, batch["x"])
  return state - 0.1 * g, {"loss": loss}


def test_ops_are_attributed_to_their_line_and_phase():
  w, x = jnp.ones((64, 64)) * 0.01, jnp.ones((256, 64))
  compiled = jax.jit(_step).lower(w, {"x": x}).compile()
  sources = op_sources(compiled.as_text())
  stacks = [stack for _, stack in sources.values() if stack]
  assert stacks, "no op carries a Python stack"
  assert any(func == "_loss" and path.endswith("test_profiling.py") for stack in stacks
             for path, func, _ in stack[:1])
  rows, wall = op_breakdown(CompiledStep(compiled, w, {"x": x}, 0, 0.0), iters=3, warmup=1)
  assert wall > 0 and rows
  mine = [r for r in rows if r.path.endswith("test_profiling.py")]
  assert {r.function for r in mine} >= {"_loss", "_step"}
  assert {r.phase for r in mine if r.function == "_loss"} == {"forward", "backward"}
  assert all(r.seconds >= 0 and r.count >= 1 for r in rows)
  # the matmul of the forward line is one of the ops of that line, once per step
  fwd = [r for r in mine if r.function == "_loss" and r.phase == "forward"]
  assert sum(r.count for r in fwd) >= 1


def test_overrides_reach_nested_fields_and_unknown_ones_are_named():
  from memarch import configs_lib
  from memarch.profiling import apply_overrides
  cfg = apply_overrides(configs_lib.load_config("configs/titans.py"),
                        {"model.remat": "full", "model.mixer.titans_mac.num_persistent": 8})
  assert cfg.model.remat == "full" and cfg.model.mixer.titans_mac.num_persistent == 8
  assert cfg.model.mixer.titans_mac.chunk_size == 16   # its neighbours keep their values
  with pytest.raises(KeyError, match="num_persistant"):
    apply_overrides(configs_lib.load_config("configs/titans.py"),
                    {"model.mixer.titans_mac.num_persistant": 8})
