"""MAD memorization data: layout, one fixed map for the whole dataset, determinism in (seed, step)."""
import numpy as np
import pytest

from memarch.data.memorization import IGNORE, MemorizationSource, kv_map


def test_layout_and_fixed_map():
  src = MemorizationSource(seq_len=32, vocab_size=256, batch_size=4, seed=3)
  b = src.batch(0)
  assert set(b) == {"inputs", "targets", "segment_ids"}
  for v in b.values():
    assert v.shape == (4, 32) and v.dtype == np.int32
  np.testing.assert_array_equal(b["segment_ids"], 1)
  x, y = b["inputs"], b["targets"]
  assert np.all(x[:, 1::2] == 255)                      # insert token V-1 at odd positions
  assert np.all(y[:, 0::2] == IGNORE)                   # keys are not scored
  assert np.all((x[:, 0::2] >= 0) & (x[:, 0::2] < 127))  # keys {0..126}
  assert np.all((y[:, 1::2] >= 127) & (y[:, 1::2] < 255))  # values {127..254}
  keys, values = src.facts
  assert len(set(keys.tolist())) == 127 and len(set(values.tolist())) == 127
  table = dict(zip(keys.tolist(), values.tolist()))
  for step in (0, 5):  # one map for every batch, and the eval split
    for bb in (src.batch(step), src.eval_set(3)):
      for k, v in zip(bb["inputs"][:, 0::2].ravel(), bb["targets"][:, 1::2].ravel()):
        assert table[int(k)] == int(v)


def test_deterministic_in_seed_and_step():
  a = MemorizationSource(seq_len=16, vocab_size=64, batch_size=3, seed=1)
  b = MemorizationSource(seq_len=16, vocab_size=64, batch_size=3, seed=1)
  for step in (0, 7):
    for name in ("inputs", "targets"):
      np.testing.assert_array_equal(a.batch(step)[name], b.batch(step)[name])
  assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
  c = MemorizationSource(seq_len=16, vocab_size=64, batch_size=3, seed=2)
  assert not np.array_equal(a.facts[1], c.facts[1])  # another seed, another map
  assert not np.array_equal(a.batch(0)["inputs"], a.eval_set(3)["inputs"])  # splits differ


def test_num_facts_limits_keys_and_validation():
  src = MemorizationSource(seq_len=64, vocab_size=32, batch_size=8, num_facts=5)
  keys, values = src.facts
  assert keys.size == 5
  np.testing.assert_array_equal(kv_map(32, 0)[0][:5], keys)  # a prefix of the full map
  assert set(src.batch(2)["inputs"][:, 0::2].ravel().tolist()) <= set(keys.tolist())
  with pytest.raises(ValueError):
    MemorizationSource(seq_len=15)
  with pytest.raises(ValueError):
    MemorizationSource(vocab_size=32, num_facts=16)
