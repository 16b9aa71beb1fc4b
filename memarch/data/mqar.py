"""Multi-query associative recall (MQAR), exactly to the Zoology spec (Arora et al. 2023,
arXiv:2312.04927, its MQAR generator).

Example i of a split is generated from `np.random.default_rng([seed, split, i])`, so any example can
be regenerated from its index: resume is exact and train/test never share a generator.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memarch.data import row_range

IGNORE = -100
TRAIN_SPLIT, TEST_SPLIT = 0, 1


def check_args(seq_len: int, num_kv_pairs: int, vocab_size: int, context_passes: int = 1):
  if num_kv_pairs < 1:
    raise ValueError(f"MQAR: num_kv_pairs must be >= 1, got {num_kv_pairs}")
  if seq_len % 2:
    raise ValueError(f"MQAR: seq_len must be even, got {seq_len}")
  if seq_len < 4 * num_kv_pairs or 2 * num_kv_pairs * context_passes + 2 * num_kv_pairs > seq_len:
    raise ValueError(f"MQAR: seq_len={seq_len} < 4 x num_kv_pairs={num_kv_pairs}; raise "
                     f"data.seq_len to >= {4 * num_kv_pairs} or lower data.num_kv_pairs")
  if vocab_size <= seq_len:
    raise ValueError(f"MQAR: vocab_size={vocab_size} must exceed seq_len={seq_len} (Zoology: V > L)")
  if vocab_size // 2 - 1 < num_kv_pairs:
    raise ValueError(f"MQAR: vocab_size={vocab_size} has too few keys for {num_kv_pairs} pairs")


def _slot_probs(num_slots: int, power_a: float) -> np.ndarray:
  j = np.arange(1, num_slots + 1, dtype=np.float64)
  p = power_a * j ** (power_a - 1)
  return p / p.sum()


def example(index: int, seq_len: int, num_kv_pairs: int, vocab_size: int, *, power_a=0.01,
            seed=0, split=TRAIN_SPLIT, random_non_queries=False, context_passes=1):
  """One MQAR example: (inputs [L], targets [L]) int32, as Zoology builds one."""
  rng = np.random.default_rng([seed, split, index])
  k = num_kv_pairs
  keys = rng.choice(np.arange(1, vocab_size // 2), size=k, replace=False)
  values = rng.choice(np.arange(vocab_size // 2, vocab_size), size=k, replace=False)
  context = np.tile(np.stack([keys, values], axis=1).reshape(-1), context_passes)
  c = context.size
  num_slots = (seq_len - c) // 2
  slots = rng.choice(num_slots, size=k, replace=False, p=_slot_probs(num_slots, power_a))
  x = np.zeros(seq_len + 1, np.int64)
  y = np.full(seq_len + 1, IGNORE, np.int64)
  x[:c] = context
  x[c + 2 * slots] = keys
  y[c + 2 * slots + 1] = values
  if random_non_queries:
    filler = x == 0
    filler[:c] = False
    x[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
  return x[:seq_len].astype(np.int32), y[1:].astype(np.int32)


def generate(num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, *,
             power_a: float = 0.01, seed: int = 0, start_index: int = 0, split: int = TRAIN_SPLIT,
             random_non_queries: bool = False):
  """Examples start_index .. start_index+num_examples-1 as (inputs, targets), int32 [N, L]."""
  check_args(seq_len, num_kv_pairs, vocab_size)
  pairs = [example(start_index + i, seq_len, num_kv_pairs, vocab_size, power_a=power_a, seed=seed,
                   split=split, random_non_queries=random_non_queries) for i in range(num_examples)]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def accuracy(logits_or_preds: np.ndarray, targets: np.ndarray) -> float:
  """Mean over examples of the per-example accuracy on labelled (query) positions."""
  preds = logits_or_preds.argmax(-1) if logits_or_preds.ndim == targets.ndim + 1 else logits_or_preds
  mask = targets != IGNORE
  per_example = ((preds == targets) & mask).sum(-1) / np.maximum(mask.sum(-1), 1)
  return float(per_example[mask.any(-1)].mean())


@dataclasses.dataclass
class MQARSource:
  """Training stream: batch `step` holds examples step*B .. step*B+B-1 of the train split
  (Zoology's 100k-example set is an epoch limit we drop: fresh examples are free here)."""
  seq_len: int
  num_kv_pairs: int
  vocab_size: int
  batch_size: int
  seed: int = 0
  power_a: float = 0.01
  random_non_queries: bool = False

  def __post_init__(self):
    check_args(self.seq_len, self.num_kv_pairs, self.vocab_size)

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    r = row_range(rows, self.batch_size)
    x, y = generate(len(r), self.seq_len, self.num_kv_pairs, self.vocab_size,
                    power_a=self.power_a, seed=self.seed, start_index=step * self.batch_size + r.start,
                    random_non_queries=self.random_non_queries)
    return {"inputs": x, "targets": y, "segment_ids": np.ones_like(x)}

  def eval_set(self, num_examples: int, *, seq_len=None, num_kv_pairs=None):
    """The fixed test split (optionally at another length / number of pairs)."""
    x, y = generate(num_examples, seq_len or self.seq_len, num_kv_pairs or self.num_kv_pairs,
                    self.vocab_size, power_a=self.power_a, seed=self.seed, split=TEST_SPLIT,
                    random_non_queries=self.random_non_queries)
    return {"inputs": x, "targets": y, "segment_ids": np.ones_like(x)}
