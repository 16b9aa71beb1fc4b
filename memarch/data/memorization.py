"""MAD memorization (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures",
athms/mad-lab `generate_memorization_instance`; arXiv 2403.17844).

Parametric recall: ONE key -> value map is fixed for the whole dataset and never shown in context, so a
model can only answer from its weights (product-key / expert memories: PEER, UltraMemV2).

Layout (MAD, no noise tokens): insert token V-1; keys are {0, ..., K-1} and values
{K, ..., V-2} with K = (V-1) // 2, paired by independent random permutations; each sequence holds L/2
pairs "key, insert" with the key drawn uniformly (with replacement) and the key's value as the target at
the insert position (-100 elsewhere). Inputs and targets are aligned: the prediction at the insert
token is scored, there is no next-token shift.

Determinism [ours]: the map comes from `np.random.default_rng([seed, MAP_STREAM])`, example i of a split
from `np.random.default_rng([seed, split, i])`; batch `step` holds train examples step*B .. step*B+B-1,
so `batch(step)` is a pure function of (seed, step) and resume is exact. `num_facts` (default K) keeps
only the first facts of the map, to sweep the number of stored facts M (docs/architectures/peer.md).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from memarch.data import row_range

IGNORE = -100
TRAIN_SPLIT, TEST_SPLIT = 0, 1
MAP_STREAM = 7_919  # a stream id distinct from the splits: the map never shares a generator with data


def kv_map(vocab_size: int, seed: int = 0, num_facts: int | None = None):
  """(keys, values) int32 [M]: the dataset's fixed key -> value map."""
  k = (vocab_size - 1) // 2
  m = k if num_facts is None else num_facts
  if not 1 <= m <= k:
    raise ValueError(f"memorization: num_facts must be in [1, (vocab_size-1)//2 = {k}], got {m}")
  rng = np.random.default_rng([seed, MAP_STREAM])
  keys = rng.permutation(np.arange(k))
  values = rng.permutation(np.arange(k, vocab_size - 1))[:k]
  return keys[:m].astype(np.int32), values[:m].astype(np.int32)


def example(index: int, seq_len: int, keys: np.ndarray, values: np.ndarray, insert_token: int, *,
            seed: int = 0, split: int = TRAIN_SPLIT):
  """One sequence: (inputs [L], targets [L]) int32 of L/2 "key, insert" pairs."""
  rng = np.random.default_rng([seed, split, index])
  pick = rng.integers(0, keys.size, size=seq_len // 2)
  x = np.empty(seq_len, np.int32)
  y = np.full(seq_len, IGNORE, np.int32)
  x[0::2] = keys[pick]
  x[1::2] = insert_token
  y[1::2] = values[pick]
  return x, y


@dataclasses.dataclass
class MemorizationSource:
  """Data source: `vocab_size`, `batch(step) -> {inputs, targets, segment_ids}` int32 [B, L]."""
  seq_len: int = 32
  vocab_size: int = 256
  batch_size: int = 32
  seed: int = 0
  num_facts: int | None = None

  def __post_init__(self):
    if self.seq_len < 2 or self.seq_len % 2:
      raise ValueError(f"memorization: seq_len must be even and >= 2, got {self.seq_len}")
    if self.vocab_size < 3:
      raise ValueError(f"memorization: vocab_size must be >= 3, got {self.vocab_size}")
    kv_map(self.vocab_size, self.seed, self.num_facts)  # validates num_facts

  @functools.cached_property
  def facts(self) -> tuple[np.ndarray, np.ndarray]:
    return kv_map(self.vocab_size, self.seed, self.num_facts)

  @property
  def insert_token(self) -> int:
    return self.vocab_size - 1

  def _examples(self, start: int, num: int, split: int, seq_len: int | None = None):
    keys, values = self.facts
    pairs = [example(start + i, seq_len or self.seq_len, keys, values, self.insert_token,
                     seed=self.seed, split=split) for i in range(num)]
    x = np.stack([p[0] for p in pairs])
    y = np.stack([p[1] for p in pairs])
    return {"inputs": x, "targets": y, "segment_ids": np.ones_like(x)}

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    r = row_range(rows, self.batch_size)
    return self._examples(step * self.batch_size + r.start, len(r), TRAIN_SPLIT)

  def eval_set(self, num_examples: int, *, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Fresh sequences (test split) over the same facts: memorization is scored on the stored map."""
    return self._examples(0, num_examples, TEST_SPLIT, seq_len)
