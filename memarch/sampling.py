"""Decoding through the recurrent state: prefill the prompt in one call, then one token per step.

Every mixer's state carries what it needs (KV caches, memory weights, conv tails, chunk phase), so a
decode step costs O(state), and the tokens equal what the parallel pass would predict.
"""
from __future__ import annotations

import math
import os
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from memarch import checkpoint as ckpt_lib
from memarch import configs_lib, sharding
from memarch.lm import LM


def generate(model: LM, prompt_BT: jax.Array, num_new: int, *, temperature: float = 0.0,
             seed: int = 0) -> jax.Array:
  """Returns [B, num_new] tokens: greedy when temperature == 0, else softmax(logits / temperature).

  Refuses (ValueError) an empty prompt, num_new < 1 and a negative or non-finite temperature: a
  negative one would sample from the reversed distribution."""
  if len(prompt_BT.shape) != 2 or prompt_BT.shape[1] < 1:
    raise ValueError(f"the prompt must hold at least one token per row, got shape "
                     f"{tuple(prompt_BT.shape)}")
  if int(num_new) != num_new or num_new < 1:
    raise ValueError(f"num_new must be a positive integer (tokens to generate), got {num_new}")
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  b, p = prompt_BT.shape
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, prompt, key):
    m = nnx.merge(graphdef, params)
    state = m.init_state(b, max_len=p + num_new)
    logits, state = m(prompt, state=state)

    def pick(logits_BV, key):
      if temperature == 0.0:
        return jnp.argmax(logits_BV, -1).astype(jnp.int32)
      return jax.random.categorical(key, logits_BV / temperature).astype(jnp.int32)

    def step(carry, key):
      logits_BV, state = carry
      tok = pick(logits_BV, key)
      logits, state = m(tok[:, None], state=state)
      return (logits[:, -1], state), tok

    _, toks = jax.lax.scan(step, (logits[:, -1], state), jax.random.split(key, num_new))
    return toks.T

  return run(params, jnp.asarray(prompt_BT, jnp.int32), jax.random.PRNGKey(seed))


def load_trained(workdir: str):
  """(config, data source, model) restored from the newest readable checkpoint in a training workdir.

  A missing workdir, config.json or checkpoint, and a workdir whose every checkpoint is unreadable,
  raise a one-line FileNotFoundError/ValueError (`memarch.cli.trained_workdir`)."""
  import ml_collections

  from memarch import cli
  cfg = ml_collections.ConfigDict(cli.trained_workdir(workdir))
  for section in ("layer_pattern", "channel_pattern"):
    cfg.model[section] = tuple(cfg.model[section])
  from memarch.data import make_source
  data = make_source(cfg.data, seed=cfg.seed, workdir=workdir, may_train_tokenizer=False)
  lm_cfg = configs_lib.lm_config(cfg, data.vocab_size)
  from memarch.optim import make_optimizer
  with sharding.mesh_context():
    model = LM(lm_cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(configs_lib.opt_config(cfg), cfg.train.num_steps),
                        wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  steps = ", ".join(map(str, cli.checkpoint_steps(workdir)))
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  # The fallback warnings are collected: when no checkpoint is readable, one error says so and
  # carries them as notes (shown with its traceback).
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      restored = ck.restore_latest(ckpt_lib.abstract_like(state))
    finally:
      ck.close()
  if restored is None:
    e = FileNotFoundError(f"no readable checkpoint in {workdir}/checkpoints: every checkpoint (steps "
                          f"{steps}) failed to restore; train again or restore a copy")
    for w in caught:
      e.add_note(str(w.message))
    raise e
  for w in caught:
    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  model, _ = nnx.merge(graphdef, restored[1])
  return cfg, data, model
