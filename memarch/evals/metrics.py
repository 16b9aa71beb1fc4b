"""String metrics for generated answers: BABILong label-set match, RULER string_match_all, passkey.

References: passkey (Mohtashami & Jaggi 2023, arXiv 2305.16300), RULER (Hsieh et al. 2024, arXiv
2404.06654) and BABILong's label-set metric (Kuratov et al. 2024, arXiv 2406.10149).
Teacher-forced accuracy on the answer tokens is computed by the evaluation loop; these helpers score
free-form generations the way the original benchmarks do.
"""
from __future__ import annotations

import re
from typing import Sequence

from memarch.data.babilong import LABELS

_BABILONG_STOPS = (".", "<context>", "<example>", "question")


def babilong_truncate(output: str) -> str:
  """Lower-case the output and keep the text before the first ".", "<context>", "<example>" or
  "question" (the output is lower-cased first, so "Question" matches in any case)."""
  out = output.lower()
  cut = min((i for i in (out.find(s) for s in _BABILONG_STOPS) if i >= 0), default=len(out))
  return out[:cut]


def babilong_label_match(output: str, question: str, target: str, task: str) -> bool:
  """BABILong's label-set metric (Kuratov et al. 2024, booydar/babilong `metrics.py`).

  Q = labels of `task` occurring in the question, O = labels occurring in the truncated output minus
  Q; correct iff the target is in O and |O| = 1. "Occurring" is case-insensitive substring
  containment, as in BABILong, so "bedrooms" counts as "bedroom".
  """
  if task not in LABELS:
    raise ValueError(f"unknown BABILong task {task!r}; choose from {sorted(LABELS)}")
  labels = [l.lower() for l in LABELS[task]]
  out = babilong_truncate(output)
  q = question.lower()
  in_question = {l for l in labels if l in q}
  in_output = {l for l in labels if l in out} - in_question
  return target.lower() in in_output and len(in_output) == 1


def string_match_all(output: str, golds: Sequence[str]) -> float:
  """RULER `string_match_all` for one sample: fraction of golds occurring case-insensitively in the
  output, in [0, 1] (RULER reports the mean over samples x 100)."""
  if isinstance(golds, str):
    golds = [golds]
  if not golds:
    raise ValueError("string_match_all needs at least one gold answer")
  out = output.lower()
  return sum(g.lower() in out for g in golds) / len(golds)


def mean_string_match_all(outputs: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
  """RULER's task score: mean string_match_all over samples x 100."""
  if len(outputs) != len(golds):
    raise ValueError(f"{len(outputs)} outputs for {len(golds)} gold lists")
  return 100.0 * sum(string_match_all(o, g) for o, g in zip(outputs, golds)) / max(len(outputs), 1)


_INT = re.compile(r"\d+")


def passkey_match(output: str, passkey: int | str) -> bool:
  """Passkey retrieval (Mohtashami & Jaggi 2023): correct iff the first run of digits in the output,
  read as an integer, equals the key."""
  m = _INT.search(output)
  return m is not None and int(m.group()) == int(passkey)
