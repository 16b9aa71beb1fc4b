"""The published BABILong data (Kuratov et al., 2024, arXiv:2406.10149), read from a local copy and
scored like our generator's examples.

The published data is organised by context length and task: one configuration per length (`0k`,
`1k`, `2k`, `4k`, ..., `128k`, in thousands of the authors' tokens), one split per task (`qa1` to
`qa20`), and examples with the fields `input` (facts hidden in book text), `question` and `target`
(the answer). `read` takes a folder `DIR` holding, for each length folder `DIR/<length>/`, either

- the configuration saved by `datasets` (`load_dataset(..., "<length>").save_to_disk(...)`, with its
  `dataset_dict.json` and one folder per task), or
- one file per task: `<task>.json` (a list of examples), `<task>.jsonl`, or `<task>*.parquet`.

`evaluate` scores every (task, length) cell by a restricted argmax, as `long_context.
evaluate_babilong` scores the generator's qa1-qa5: the prompt is `input + "\\nQuestion: " +
question + "\\nAnswer: "` (our generator's layout), every candidate answer is scored teacher-forced
from the state after the prompt, and the most likely one is the prediction. The candidates of a task
are the distinct targets of that task over all lengths read (e.g. the six rooms of qa1, yes/no for
qa6). Prompts run through the state in `segment_len`-token segments. Nothing is downloaded.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from typing import Callable, Sequence

import numpy as np

from memarch.data.babilong import ANSWER_PREFIX, QUESTION_PREFIX
from memarch.evals.long_context import StreamingRunner, _batches, _check_vocab, score_labels

TASKS = tuple(f"qa{i}" for i in range(1, 21))
FIELDS = ("input", "question", "target")


def length_key(name: str) -> float:
  m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", name)
  if not m:
    return float("inf")
  return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]


def lengths_in(path: str) -> list[str]:
  """The length folders under `path` (0k, 1k, ...), shortest first."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--babilong_path {path} is not a folder (it should hold one folder per "
                            "length: 0k, 1k, 4k, ...)")
  names = [n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))
           and length_key(n) != float("inf")]
  if not names:
    raise FileNotFoundError(f"--babilong_path {path} has no length folders (0k, 1k, 4k, ...)")
  return sorted(names, key=length_key)


def _check(rows, origin: str) -> list[dict]:
  rows = list(rows)
  for r in rows[:1]:
    missing = [f for f in FIELDS if f not in r]
    if missing:
      raise ValueError(f"{origin}: examples lack the field(s) {', '.join(missing)} of the published "
                       "BABILong format (input, question, target)")
  return [{f: str(r[f]) for f in FIELDS} for r in rows]


def read(path: str, task: str, length: str) -> list[dict]:
  """The examples {input, question, target} of `task` at `length` (module docstring)."""
  d = os.path.join(path, length)
  if os.path.exists(os.path.join(d, "dataset_dict.json")):
    import datasets  # pylint: disable=import-outside-toplevel
    dd = datasets.load_from_disk(d)
    if task not in dd:
      raise FileNotFoundError(f"{d} (saved by datasets) has no split {task}; it has "
                              f"{', '.join(sorted(dd))}")
    return _check(dd[task], f"{d}[{task}]")
  for ext in ("json", "jsonl"):
    f = os.path.join(d, f"{task}.{ext}")
    if os.path.exists(f):
      with open(f) as fh:
        rows = json.load(fh) if ext == "json" else [json.loads(l) for l in fh if l.strip()]
      return _check(rows, f)
  parquet = sorted(glob.glob(os.path.join(d, f"{task}.parquet")) +
                   glob.glob(os.path.join(d, f"{task}-*.parquet")))
  if parquet:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    rows = [r for f in parquet for r in pq.read_table(f).to_pylist()]
    return _check(rows, parquet[0])
  raise FileNotFoundError(f"no BABILong {task} at {d}: expected a folder saved by datasets, "
                          f"{task}.json, {task}.jsonl or {task}*.parquet")


def evaluate(runner: StreamingRunner, path: str, *, tasks: Sequence[str] | None = None,
             lengths: Sequence[str] | None = None, num_examples: int = 20, batch_size: int = 8,
             tokenizer=None, log: Callable[[str], None] | None = None) -> dict:
  """Accuracy per task and length of the first `num_examples` examples of each cell (restricted
  argmax over the task's targets; module docstring). Same result layout as
  `long_context.evaluate_babilong`, with length names (1k, 4k, ...) as lengths."""
  lengths = list(lengths or lengths_in(path))
  tasks = list(tasks or [t for t in TASKS if any(
      glob.glob(os.path.join(path, lengths[0], f"{t}[.-]*"))
      + glob.glob(os.path.join(path, lengths[0], t)))])
  if not tasks:
    raise FileNotFoundError(f"no BABILong task (qa1..qa20) found under {path}/{lengths[0]}")
  _check_vocab(runner, tokenizer)
  data = {(t, l): read(path, t, l)[:num_examples] for t in tasks for l in lengths}
  acc: dict[str, dict[str, float]] = {}
  for task in tasks:
    labels = sorted({e["target"] for l in lengths for e in data[(task, l)]})
    label_ids = [tokenizer.encode(a) for a in labels]
    acc[task] = {}
    for length in lengths:
      t0 = time.time()
      exs = data[(task, length)]
      if not exs:
        raise ValueError(f"{path}/{length} has no {task} examples")
      correct = []
      for batch, n in _batches(exs, batch_size):
        prompts = [tokenizer.encode(e["input"] + QUESTION_PREFIX + e["question"] + ANSWER_PREFIX)
                   for e in batch]
        pred = score_labels(runner, prompts, label_ids).argmax(-1)[:n]
        correct += [labels[p] == e["target"] for p, e in zip(pred, batch[:n])]
      acc[task][length] = float(np.mean(correct))
      if log:
        log(f"babilong (published data) {task} {length}: accuracy {acc[task][length]:.3f} "
            f"({len(exs)} examples, {len(labels)} candidate answers, {time.time() - t0:.1f}s)")
  mean = {l: float(np.mean([acc[t][l] for t in tasks])) for l in lengths}
  return {"name": f"BABILong (published data, {os.path.basename(os.path.normpath(path))}, "
                  f"{getattr(tokenizer, 'name', 'byte')} tokenizer)",
          "metric": "restricted argmax over the task's answers (teacher-forced answer "
                    "log-likelihood after '\\nAnswer: ')",
          "tasks": tasks, "lengths": lengths, "accuracy": acc, "mean": mean,
          "num_examples": int(num_examples), "source": os.path.abspath(path),
          "segment_len": runner.segment_len}
