"""The training loop's batch stream: this process's rows of each step's batch, built ahead of the
step in a background thread by grain, so data loading overlaps the computation."""
from __future__ import annotations

from typing import Iterator

import numpy as np

PREFETCH = 2  # batches built ahead of the step that consumes them


def batches(source, first: int, stop: int, rows: tuple[int, int] | None = None, *,
            prefetch: int = PREFETCH) -> Iterator[dict[str, np.ndarray]]:
  """`source.batch(i, rows)` for i = first .. stop - 1, in order. Each batch is a pure function of
  its index, so a resumed run continues with exactly the batches it would have seen."""
  import grain  # pylint: disable=import-outside-toplevel  (absent on some accelerator images)
  dataset = grain.MapDataset.range(first, stop).map(lambda i: source.batch(int(i), rows))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                        prefetch_buffer_size=prefetch)))
