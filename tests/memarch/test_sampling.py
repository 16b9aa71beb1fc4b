"""Greedy decoding through the recurrent state equals the parallel pass's argmax (every mixer in a
hybrid)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memarch.lm import LM, LMConfig
from memarch.sampling import generate
from memarch.sharding import mesh_context


def test_greedy_decode_matches_parallel_argmax():
  with mesh_context():
    model = LM(LMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=2,
                        layer_pattern=("attention", "swa"), mixer_kwargs={"swa": {"window": 4}}),
               rngs=nnx.Rngs(1))
  prompt = jax.random.randint(jax.random.PRNGKey(0), (2, 5), 0, 32)
  new = generate(model, prompt, 6)
  full = jnp.concatenate([prompt, new], axis=1)
  logits, _ = model(full)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 4:-1], -1)), np.asarray(new))
  sampled = generate(model, prompt, 6, temperature=1.0, seed=3)
  assert sampled.shape == (2, 6) and int(sampled.max()) < 32
