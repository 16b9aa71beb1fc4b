"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300) and RULER S-NIAH-1 style
needle-in-a-haystack data (Hsieh et al. 2024, arXiv 2404.06654).

Passkey (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv:2305.16300): an instruction line, the
filler line repeated n_prefix times, "The pass key is {k}. Remember it. {k} is the pass key.", the
filler n_suffix times, then "What is the pass key? The pass key is"; lines joined by "\\n", k uniform in
[1, 50000]. Depth = n_prefix / (n_prefix + n_suffix).

S-NIAH-1 (RULER, Hsieh et al. 2024, arXiv:2404.06654): a noise haystack (the passkey filler sentences)
with needles "One of the special magic numbers for {key} is: {value}." at sentence boundaries; keys are
"adjective-noun" words (from memarch's own word lists; RULER uses `wonderwords`) and values uniform
7-digit numbers. `num_needles` > 1 gives RULER's multi-key setting (distinct keys, one queried: MK-1
style but with the noise haystack) and `num_queries=num_needles` queries all of them (MQ style).

Lengths: `length` is the token budget of the whole prompt (everything before the answer) in `tokenizer`
(byte-level by default). The haystack is the largest that fits, found by bisection over the number of
filler units (as RULER does), so `length - unit < num_tokens <= length`, a unit being one filler line
(passkey, ~90 bytes) or one filler sentence (NIAH, <= 22 bytes). Examples are deterministic in
(seed, split, index) through `np.random.default_rng`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from memarch.data import row_range
from memarch.data.babilong import ADJECTIVES, NOUNS
from memarch.data.text import prompt_answer_row
from memarch.data.tokenizer import ByteTokenizer, num_tokens

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
                  "again.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
MAX_PASSKEY = 50000

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
              "it. I will quiz you about the numbers afterwards.")
NIAH_ANSWER_PREFIX = "\nAnswer: "

_PASSKEY_STREAM, _NIAH_STREAM, _DEPTH_STREAM = 0x9A55, 0x4EED, 0xDE97


def _largest_fitting(build: Callable[[int], str], length: int, tok) -> int:
  """Largest n >= 0 with num_tokens(build(n)) <= length; token counts grow with n."""
  base = num_tokens(tok, build(0))
  if base > length:
    raise ValueError(f"length={length} tokens is too short: the prompt without any haystack already "
                     f"has {base} tokens")
  lo, hi = 0, 1
  while num_tokens(tok, build(hi)) <= length:
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if num_tokens(tok, build(mid)) <= length:
      lo = mid
    else:
      hi = mid
  return lo


def _check_depth(depth: float):
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must lie in [0, 1], got {depth}")


def make_passkey(length: int, depth: float, index: int, *, seed: int = 0, tokenizer=None,
                 split: int = 0) -> dict:
  """Passkey example: prompt (context + "\\n" + question + " ") of at most `length` tokens.

  Returns context, question, prompt, answer (the key's digits), passkey (int), depth (realised
  n_prefix / (n_prefix + n_suffix), 0 when no filler line fits), requested_depth, n_prefix, n_suffix,
  num_tokens (of the prompt), index.
  """
  _check_depth(depth)
  tok = tokenizer or ByteTokenizer()
  k = int(np.random.default_rng([seed, split, _PASSKEY_STREAM, index]).integers(1, MAX_PASSKEY + 1))
  key_line = f"The pass key is {k}. Remember it. {k} is the pass key."

  def parts(n_prefix, n_suffix):
    context = "\n".join([PASSKEY_INTRO] + [PASSKEY_FILLER] * n_prefix + [key_line]
                        + [PASSKEY_FILLER] * n_suffix)
    return context, context + "\n" + PASSKEY_QUESTION + " "

  n = _largest_fitting(lambda m: parts(m, 0)[1], length, tok)
  n_prefix = int(round(depth * n))
  context, prompt = parts(n_prefix, n - n_prefix)
  return {"context": context, "question": PASSKEY_QUESTION, "prompt": prompt, "answer": str(k),
          "passkey": k, "depth": n_prefix / n if n else 0.0, "requested_depth": float(depth),
          "n_prefix": n_prefix, "n_suffix": n - n_prefix, "num_tokens": num_tokens(tok, prompt),
          "length": int(length), "index": int(index)}


def _niah_question(keys: Sequence[str]) -> str:
  if len(keys) == 1:
    joined = keys[0]
  else:
    joined = ", ".join(keys[:-1]) + " and " + keys[-1]
  return f"What are all the special magic numbers for {joined} mentioned in the provided text?"


def make_niah(length: int, depth: float | Sequence[float], index: int, *, num_needles: int = 1,
              num_queries: int = 1, seed: int = 0, tokenizer=None, split: int = 0) -> dict:
  """S-NIAH-1 style example: noise haystack, word -> 7-digit number needles.

  `depth` is a fraction in [0, 1] for needle 0 (the other needles go to uniformly random sentence
  boundaries [ours]) or a sequence with one depth per needle. Needles 0..num_queries-1 are queried
  (num_queries=num_needles asks for all). The prompt is NIAH_INTRO + "\\n" + context + "\\n" + question
  + "\\nAnswer: " and the answer the queried values joined by ", ".

  Returns prompt, context, question, answer, golds (queried values, strings), keys, values,
  needle_depths (realised boundary / num_sentences per needle), depth (needle 0), num_sentences,
  num_tokens (of the prompt), length, index.
  """
  if not 1 <= num_queries <= num_needles:
    raise ValueError(f"need 1 <= num_queries <= num_needles, got {num_queries}, {num_needles}")
  depths = [float(depth)] if np.ndim(depth) == 0 else [float(d) for d in depth]
  if np.ndim(depth) != 0 and len(depths) != num_needles:
    raise ValueError(f"depth has {len(depths)} entries for {num_needles} needles")
  for d in depths:
    _check_depth(d)
  tok = tokenizer or ByteTokenizer()
  rng = np.random.default_rng([seed, split, _NIAH_STREAM, index])
  pairs = rng.choice(len(ADJECTIVES) * len(NOUNS), size=num_needles, replace=False)
  keys = [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]
  values = [str(1_000_000 + v) for v in rng.choice(9_000_000, size=num_needles, replace=False)]
  # Random depths for the needles without an explicit one, drawn before sizing so they do not depend
  # on the length.
  extra = rng.random(num_needles)
  fractions = depths + [float(x) for x in extra[len(depths):]]
  needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
  question = _niah_question(keys[:num_queries])

  def parts(m):
    boundaries = [int(round(f * m)) for f in fractions]
    pieces = []
    for i in range(m + 1):
      pieces += [needles[j] for j in range(num_needles) if boundaries[j] == i]
      if i < m:
        pieces.append(NOISE_SENTENCES[i % len(NOISE_SENTENCES)])
    context = " ".join(pieces)
    return context, NIAH_INTRO + "\n" + context + "\n" + question + NIAH_ANSWER_PREFIX, boundaries

  m = _largest_fitting(lambda n: parts(n)[1], length, tok)
  context, prompt, boundaries = parts(m)
  golds = values[:num_queries]
  return {"prompt": prompt, "context": context, "question": question, "answer": ", ".join(golds),
          "golds": golds, "keys": keys, "values": values,
          "needle_depths": [b / m if m else 0.0 for b in boundaries],
          "depth": boundaries[0] / m if m else 0.0, "num_sentences": m,
          "num_tokens": num_tokens(tok, prompt), "length": int(length), "index": int(index)}


class _PromptAnswerSource:
  """Rows prompt + answer, targets on the answer tokens only, under the data contract
  (memarch.data.text). Row i = step * batch_size + b is example i; its depth is `depth` or, if None,
  uniform in [0, 1] from `default_rng([seed, split, depth_stream, i])`. The prompt budget is
  seq_len + 1 - (longest answer), so every row fits seq_len exactly without truncation.
  `prompt_loss=True` puts the loss on every token of the row, as in language-model training
  (prompt_answer_row); the evaluations still score the answer only. `landmark_block=L` > 0 writes
  rows in landmark attention's layout (`layers.landmark.insert_landmarks`, Mohtashami & Jaggi
  section 3.1): a landmark token (id = the tokenizer's vocabulary size, so `vocab_size` is one
  larger) after every L - 1 content tokens, loss masked there; a row then holds seq_len - seq_len / L
  content tokens and seq_len stream tokens."""

  max_answer: str = ""

  def __init__(self, seq_len: int, *, batch_size: int, seed: int = 0, tokenizer=None, split: int = 0,
               depth: float | None = None, prompt_loss: bool = False, landmark_block: int = 0):
    self.seq_len, self.batch_size, self.seed, self.split = int(seq_len), int(batch_size), seed, split
    self.prompt_loss = bool(prompt_loss)
    self.depth = depth
    self.tokenizer = tokenizer or ByteTokenizer()
    self.vocab_size = int(self.tokenizer.vocab_size)
    self.landmark_block = int(landmark_block)
    self.content_len = self.seq_len
    if self.landmark_block:
      if self.landmark_block < 2 or self.seq_len % self.landmark_block:
        raise ValueError(f"landmark_block={landmark_block} must be >= 2 and divide seq_len="
                         f"{seq_len}; choose a seq_len that is a multiple of the block")
      self.landmark_id = self.vocab_size
      self.vocab_size += 1
      self.content_len = self.seq_len - self.seq_len // self.landmark_block
    self.prompt_length = self.content_len + 1 - num_tokens(self.tokenizer, self.max_answer)

  def _depth(self, i: int) -> float:
    if self.depth is not None:
      return float(self.depth)
    return float(np.random.default_rng([self.seed, self.split, _DEPTH_STREAM, i]).random())

  def example(self, i: int) -> dict:
    raise NotImplementedError

  def encode(self, example: dict):
    """(inputs, targets, segment_ids, answer_start) for one example dict (answer_start: the input
    position whose target is the first answer token, counted in the row's own layout)."""
    x, y, seg, start = prompt_answer_row(self.tokenizer.encode(example["prompt"]),
                                         self.tokenizer.encode(example["answer"]), self.content_len,
                                         self.tokenizer.pad_id, prompt_loss=self.prompt_loss)
    if not self.landmark_block:
      return x, y, seg, start
    from layers.landmark import insert_landmarks, stream_index
    x_s, y_s = insert_landmarks(x[None], y[None], block_size=self.landmark_block,
                                landmark_id=self.landmark_id)
    last_real = stream_index(int(seg.sum()) - 1, self.landmark_block)
    seg_s = (np.arange(self.seq_len) <= last_real).astype(seg.dtype)
    return x_s[0], y_s[0], seg_s, stream_index(start, self.landmark_block)

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    rows = [self.encode(self.example(step * self.batch_size + b))
            for b in row_range(rows, self.batch_size)]
    return {"inputs": np.stack([r[0] for r in rows]), "targets": np.stack([r[1] for r in rows]),
            "segment_ids": np.stack([r[2] for r in rows])}


class PasskeySource(_PromptAnswerSource):
  """Passkey rows of `seq_len` tokens (default 512): `make_passkey` prompt + the key's digits."""

  max_answer = str(MAX_PASSKEY)

  def __init__(self, seq_len: int = 512, **kw):
    super().__init__(seq_len, **kw)

  def example(self, i: int) -> dict:
    return make_passkey(self.prompt_length, self._depth(i), i, seed=self.seed,
                        tokenizer=self.tokenizer, split=self.split)


class NIAHSource(_PromptAnswerSource):
  """S-NIAH-1 style rows of `seq_len` tokens (default 512): `make_niah` prompt + queried values."""

  def __init__(self, seq_len: int = 512, *, num_needles: int = 1, num_queries: int = 1, **kw):
    self.num_needles, self.num_queries = int(num_needles), int(num_queries)
    self.max_answer = ", ".join(["9999999"] * self.num_queries)
    super().__init__(seq_len, **kw)

  def example(self, i: int) -> dict:
    return make_niah(self.prompt_length, self._depth(i), i, num_needles=self.num_needles,
                     num_queries=self.num_queries, seed=self.seed, tokenizer=self.tokenizer,
                     split=self.split)
