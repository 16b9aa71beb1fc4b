"""Decoding through the recurrent state: prefill the prompt in one call, then one token per step.

Every mixer's state carries what it needs (KV caches, memory weights, conv tails, chunk phase), so a
decode step costs O(state), and the tokens equal what the parallel pass would predict.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from memarch import checkpoint as ckpt_lib
from memarch import configs_lib, sharding
from memarch.lm import LM


def generate(model: LM, prompt_BT: jax.Array, num_new: int, *, temperature: float = 0.0,
             seed: int = 0) -> jax.Array:
  """Returns [B, num_new] tokens: greedy when temperature == 0, else softmax(logits / temperature)."""
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
  """(config, model) restored from the newest checkpoint in a training workdir."""
  import ml_collections
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
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
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored = ck.restore_latest(ckpt_lib.abstract_like(state))
  ck.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first with "
                            "scripts/train.py --workdir=" + workdir)
  model, _ = nnx.merge(graphdef, restored[1])
  return cfg, data, model
