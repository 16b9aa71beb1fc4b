"""Segment-by-segment evaluation through the state equals one full pass; the restricted-argmax scorer
sums the whole label's log-likelihood."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memarch import sharding
from memarch.evals import long_context
from memarch.evals.long_context import StreamingRunner, score_labels
from memarch.lm import LM, LMConfig
from pallas_kernels.testing import rel_rms


def _lm(pattern, dtype="float32", **mixer):
  cfg = LMConfig(vocab_size=24, d_model=16, num_layers=1, num_heads=2, layer_pattern=(pattern,),
                 mixer_kwargs={pattern: mixer} if mixer else {}, dtype=dtype)
  with sharding.mesh_context():
    return LM(cfg, rngs=nnx.Rngs(0))


def _full_pass(model, tokens):
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(params, jnp.asarray(tokens))


def test_segments_equal_full_pass_attention_float64(x64):
  model = _lm("attention", dtype="float64")
  tokens = np.random.default_rng(0).integers(0, 24, (2, 21)).astype(np.int32)
  full = _full_pass(model, tokens)
  runner = StreamingRunner(model, segment_len=4)  # 21 = 5 x 4 + 1: a ragged last segment
  seg, state = runner.run_segments(tokens)
  # The LM computes in float64 and returns float32 logits: equal up to that final rounding.
  np.testing.assert_allclose(np.asarray(seg), np.asarray(full), rtol=1e-6, atol=1e-6)
  assert int(state[0]["pos"][0]) == 21

  # Prompts of different lengths in one batch (masked stages: 18 = 4+4+4+4+2, 7 = 4+2+1) give each
  # prompt its own last logits, and teacher-forced continuations from that state score like the
  # full pass.
  prompts = [tokens[0, :18], tokens[1, :7]]
  conts = [tokens[0, 18:21], tokens[1, 7:9]]
  logp_full = np.asarray(jax.nn.log_softmax(full, -1))
  last, st = runner.prefill(prompts, max_len=21)
  for i, p in enumerate(prompts):
    np.testing.assert_allclose(np.asarray(last[i]), np.asarray(full[i, len(p) - 1]), atol=1e-6)
  logp, hit, mask = runner.continuation(st, last, conts)
  for i, (p, c) in enumerate(zip(prompts, conts)):
    ref = [logp_full[i, len(p) - 1 + k, c[k]] for k in range(len(c))]
    np.testing.assert_allclose(logp[i, :len(c)], ref, atol=1e-5)
    np.testing.assert_array_equal(hit[i, :len(c)],
                                  [full[i, len(p) - 1 + k].argmax() == c[k] for k in range(len(c))])
  np.testing.assert_array_equal(mask.sum(-1), [3, 2])


def test_segments_equal_full_pass_gated_deltanet():
  model = _lm("gated_deltanet", chunk_size=4)
  tokens = np.random.default_rng(1).integers(0, 24, (2, 18)).astype(np.int32)
  full = _full_pass(model, tokens)
  seg, _ = StreamingRunner(model, segment_len=6).run_segments(tokens)  # not a multiple of the chunk
  assert rel_rms(seg, full) < 1e-5


class Bigram(nnx.Module):
  """Hand-built LM: logits of the next token = table[current token]; a trivial per-row state."""

  def __init__(self, table):
    self.cfg = LMConfig(vocab_size=table.shape[0], d_model=2, num_layers=1, num_heads=1)
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def init_state(self, batch_size, *, max_len=None, dtype=jnp.float32):
    return [{"pos": jnp.zeros((batch_size,), jnp.int32)}]

  def __call__(self, tokens_BT, *, state=None, segment_ids_BT=None):
    pos = state[0]["pos"] if state is not None else jnp.zeros(tokens_BT.shape[:1], jnp.int32)
    return self.table[...][tokens_BT], [{"pos": pos + tokens_BT.shape[1]}]


def test_restricted_argmax_scores_whole_label():
  # Tokens: 0 = prompt end 'x', 1 'c', 2 'a', 3 't', 4 'r', 5 'd', 6 'o', 7 'g'.
  v = 8
  table = np.full((v, v), -8.0)
  table[0, 5], table[0, 1] = 2.0, 1.5      # after the prompt, 'd' is a bit likelier than 'c' ...
  table[5, 6], table[6, 7] = -6.0, 3.0     # ... but "dog" then needs an unlikely 'o'
  table[1, 2] = 4.0
  table[2, 3], table[2, 4] = 3.0, 1.0      # "cat" beats "car" only on its last token
  runner = StreamingRunner(Bigram(table), segment_len=4)
  labels = [np.array([5, 6, 7]), np.array([1, 2, 4]), np.array([1, 2, 3])]   # dog, car, cat
  prompts = [np.array([3, 3, 3, 3, 3, 0]), np.array([0])]
  scores = score_labels(runner, prompts, labels)
  assert scores.shape == (2, 3)
  assert (scores.argmax(-1) == 2).all()    # "cat"
  # First-token-only scoring would have picked "dog": the scorer must use every label token.
  first = jax.nn.log_softmax(jnp.asarray(table[0]))
  assert int(jnp.argmax(first[jnp.array([5, 1, 1])])) == 0
  logp = jax.nn.log_softmax(jnp.asarray(table), -1)
  cat = float(logp[0, 1] + logp[1, 2] + logp[2, 3])
  np.testing.assert_allclose(scores[:, 2], cat, rtol=1e-6)


def test_prefill_rejects_empty_prompt_and_short_max_len():
  runner = StreamingRunner(Bigram(np.zeros((4, 4))), segment_len=4)
  with pytest.raises(ValueError, match="non-empty"):
    runner.prefill([np.array([], np.int32)], max_len=4)
  with pytest.raises(ValueError, match="exceeds max_len"):
    runner.prefill([np.arange(4) % 4, np.arange(9) % 4], max_len=8)


def test_pieces_cover_the_prompt():
  for n in (1, 7, 8, 9, 300, 513):
    full, bits = long_context._pieces(n, 8)
    assert full * 8 + sum(bits) == n and all(b < 8 for b in bits) and bits == sorted(bits)[::-1]


class LandmarkProbe(Bigram):
  """Bigram logits, plus -50 on token 0 wherever a landmark (id 5) sits off the layout's positions
  (p mod 4 = 3) or a content token on one: a misplaced landmark shows in token 0's score."""

  def __call__(self, tokens_BT, *, state=None, segment_ids_BT=None):
    pos0 = state[0]["pos"] if state is not None else jnp.zeros(tokens_BT.shape[:1], jnp.int32)
    pos = pos0[:, None] + jnp.arange(tokens_BT.shape[1])[None]
    wrong = (tokens_BT == 5) != (pos % 4 == 3)
    logits = self.table[...][tokens_BT].at[..., 0].add(-50.0 * wrong)
    return logits, [{"pos": pos0 + tokens_BT.shape[1]}]


def test_landmark_runner_layout_and_scores():
  from layers.landmark import insert_landmarks
  table = np.random.default_rng(0).normal(size=(6, 6))
  runner = StreamingRunner(LandmarkProbe(table), segment_len=4, landmark_block=4, landmark_id=5)
  # Prompts of 3 and 5 content tokens: the first ends exactly before a landmark, which then opens
  # the continuation; the continuations cross further landmarks.
  prompts = [np.array([1, 2, 3]), np.array([4, 1, 0, 2, 3])]
  conts = [np.array([0, 1, 0, 2, 0]), np.array([0, 0, 4])]
  for p, c in zip(prompts, conts):
    full, _ = insert_landmarks(np.concatenate([p, c])[None], np.zeros((1, len(p) + len(c))),
                               block_size=4, landmark_id=5)
    ps = runner.prompt_stream(p)
    assert ps[-1] == p[-1] and np.array_equal(ps, full[0, :len(ps)])
  streams = [runner.prompt_stream(p) for p in prompts]
  last, state = runner.prefill(streams, max_len=runner.stream_len(10))
  logp, hit, mask = runner.continuation(state, last, conts, prompt_lens=[3, 5])
  ref = jax.nn.log_softmax(jnp.asarray(table), -1)
  for b, (p, c) in enumerate(zip(prompts, conts)):
    seq = np.concatenate([p, c])
    want = [float(ref[seq[len(p) + j - 1], c[j]]) for j in range(len(c))]  # landmarks skipped
    np.testing.assert_allclose(logp[b, :len(c)], want, rtol=1e-5)
    assert mask[b].sum() == len(c)
  with pytest.raises(ValueError, match="prompt_lens"):
    runner.continuation(state, last, conts)
  with pytest.raises(NotImplementedError, match="landmark"):
    runner.greedy(state, last, 2)
