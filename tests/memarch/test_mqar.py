import numpy as np
import pytest

from memarch.data import mqar


def test_layout_matches_zoology_spec():
  v, l, k = 256, 64, 4
  x, y = mqar.generate(50, l, k, v, seed=3)
  assert x.shape == y.shape == (50, l) and x.dtype == np.int32
  for xi, yi in zip(x, y):
    keys, vals = xi[0:2 * k:2], xi[1:2 * k:2]
    assert np.all((1 <= keys) & (keys < v // 2)) and len(set(keys)) == k
    assert np.all((v // 2 <= vals) & (vals < v)) and len(set(vals)) == k
    lab = np.nonzero(yi != mqar.IGNORE)[0]
    assert len(lab) == k
    kv = dict(zip(keys, vals))
    for p in lab:
      # the target sits on the input position of its query key; every key is queried once
      assert xi[p] in kv and yi[p] == kv[xi[p]]
      assert (p - 2 * k) % 2 == 0
    assert sorted(xi[lab]) == sorted(keys)
    rest = np.ones(l, bool); rest[:2 * k] = False; rest[lab] = False
    assert np.all(xi[rest] == 0)


def test_power_law_slots():
  # Zoology's power-law query positions (Arora et al. 2023, arXiv 2312.04927): for L=64, K=4,
  # P(slot 0) ~ .251 of the queries land in the first slot
  x, y = mqar.generate(400, 64, 4, 256, seed=0)
  first_slot = (y[:, 8] != mqar.IGNORE).mean()
  assert 0.6 < first_slot < 0.9  # P(slot 0 is one of 4 draws without replacement)
  lab = np.argwhere(y != mqar.IGNORE)[:, 1]
  slots = (lab - 8) // 2
  assert np.mean(slots < 6) > 0.5


def test_deterministic_by_index_and_split():
  a = mqar.generate(4, 64, 4, 256, seed=1, start_index=10)
  b = mqar.generate(14, 64, 4, 256, seed=1)
  np.testing.assert_array_equal(a[0], b[0][10:])
  t = mqar.generate(4, 64, 4, 256, seed=1, split=mqar.TEST_SPLIT)
  assert not np.array_equal(t[0], b[0][:4])


def test_accuracy_metric():
  y = np.array([[-100, 5, -100, 7], [3, -100, -100, -100]])
  preds = np.array([[0, 5, 0, 1], [3, 0, 0, 0]])
  assert mqar.accuracy(preds, y) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("args,msg", [((64, 20, 256), "4 x num_kv_pairs"), ((63, 4, 256), "even"),
                                      ((64, 4, 64), "must exceed")])
def test_bad_args(args, msg):
  with pytest.raises(ValueError, match=msg):
    mqar.generate(1, *args)
