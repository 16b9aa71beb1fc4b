"""scripts/recall_probe.py: the key-alignment statistic on hand-built projections."""
import numpy as np

from memarch.testing import load_script


def test_key_alignment_finds_the_matching_pair():
  """Two pairs (keys 5, 7), queries for 7 then 5 with filler 0 between; the value token's key of
  pair i is the unit vector e_i and a query for key i reads e_i: matching cos 1, others 0 at the
  value token; at the key token (a constant key) both are equal."""
  rec = load_script("recall_probe")
  inputs = np.array([[5, 9, 7, 8, 0, 7, 0, 5]])
  B, T, H, D = 1, 8, 1, 2
  k = np.zeros((B, T, H, D))
  k[0, 1, 0] = [1, 0]         # value token of pair 0
  k[0, 3, 0] = [0, 1]         # value token of pair 1
  k[0, 0, 0] = k[0, 2, 0] = [1, 1]
  q = np.zeros((B, T, H, D))
  q[0, 5, 0] = [0, 1]         # a query for key 7 (pair 1)
  q[0, 7, 0] = [1, 0]         # a query for key 5 (pair 0)
  m, o = rec.key_alignment(inputs, q, k, num_pairs=2, offset=1)
  np.testing.assert_allclose(m, [1.0], atol=1e-6)
  np.testing.assert_allclose(o, [0.0], atol=1e-6)
  m, o = rec.key_alignment(inputs, q, k, num_pairs=2, offset=0)
  np.testing.assert_allclose(m, o)
