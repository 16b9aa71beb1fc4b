"""Real-text data sources: in-memory documents (local text files, the embedded Shakespeare plays)
and TFDS datasets, packed into fixed-length rows.

Data contract (shared by every source in memarch.data): `vocab_size` and
`batch(step) -> {"inputs", "targets", "segment_ids"}`, int32 [B, L]; targets are the next token or -100
(ignored); segment_ids number the documents of a row from 1 and are 0 on padding. A batch is a pure
function of (seed, step): nothing is iterated, so a resumed run sees exactly the same data.

Packing. Every document is tokenized and followed by EOS; the EOS belongs to the document it ends. A row
holds seq_len + 1 consecutive tokens: inputs are the first seq_len, targets the last seq_len. The last
real token of a document predicts its EOS (the model learns where documents end); the target of the EOS
itself, i.e. the first token of the next document, is -100, so nothing is ever predicted across a
document boundary [ours]. Mixers reset their memory where segment_ids change.

Order. Row g = step * batch_size + b lives in epoch g // R at position g % R (R rows per epoch); the
position goes through a seeded bijection of [0, R) drawn per epoch (`permute_indices`, a Feistel
network with cycle walking, O(1) memory, so even a 30M-document TFDS split needs no permutation table).

`DocumentSource` (local files: `LocalTextSource`; the embedded plays: `memarch.data.shakespeare`)
tokenizes its documents once and cuts the token stream into windows (stride seq_len, exact packing,
nothing dropped). Files are read as bytes: the byte tokenizer sees them unchanged. `TFDSTextSource`
never tokenizes a whole split: a row takes a block of k permuted documents, tokenized on demand (see
its docstring).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from memarch.data import row_range

IGNORE = -100
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------------
# Lazy, seeded permutation of [0, n).


def _mix64(z: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer on uint64 arrays (wrap-around arithmetic is intended)."""
  with np.errstate(over="ignore"):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute_indices(idx, n: int, seed: int, epoch: int) -> np.ndarray:
  """Image of `idx` (ints in [0, n)) under a bijection of [0, n) fixed by (seed, epoch).

  A 4-round Feistel network on the smallest even-bit domain 2^b >= n, with cycle walking: values that
  land outside [0, n) are mapped again until they fall inside, which keeps the map a bijection of
  [0, n) (domain <= 4n, so a few rounds on average).
  """
  idx = np.asarray(idx, dtype=np.int64)
  if n <= 0:
    raise ValueError(f"permute_indices: n must be positive, got {n}")
  if np.any((idx < 0) | (idx >= n)):
    raise ValueError(f"permute_indices: indices must lie in [0, {n})")
  if n == 1:
    return np.zeros_like(idx)
  bits = max(2, int(n - 1).bit_length())
  bits += bits % 2
  half = np.uint64(bits // 2)
  mask = np.uint64((1 << (bits // 2)) - 1)
  keys = np.random.default_rng([seed & _MASK64, epoch & _MASK64, 0x7E47]).integers(
      0, 2**63, size=4, dtype=np.uint64)

  def feistel(x: np.ndarray) -> np.ndarray:
    left, right = x >> half, x & mask
    for k in keys:
      left, right = right, left ^ (_mix64(right ^ k) & mask)
    return (left << half) | right

  out = feistel(idx.reshape(-1).astype(np.uint64))
  outside = out >= np.uint64(n)
  while np.any(outside):
    out[outside] = feistel(out[outside])
    outside = out >= np.uint64(n)
  return out.astype(np.int64).reshape(idx.shape)


# ---------------------------------------------------------------------------------------------------
# Row layouts shared by the text, BABILong-style and needle sources.


def row_from_tokens(tokens: np.ndarray, seg: np.ndarray, seq_len: int, pad_id: int):
  """(inputs, targets, segment_ids) [seq_len] from seq_len+1 (or fewer) tokens and their segment ids.

  Padding gets segment 0; a target is kept only where the token and its successor share a nonzero
  segment, which masks both document boundaries and padding.
  """
  tokens = np.asarray(tokens, np.int64)[: seq_len + 1]
  seg = np.asarray(seg, np.int64)[: seq_len + 1]
  n = tokens.size
  tok = np.full(seq_len + 1, pad_id, np.int64)
  sg = np.zeros(seq_len + 1, np.int64)
  tok[:n], sg[:n] = tokens, seg
  same = (sg[:-1] == sg[1:]) & (sg[1:] != 0)
  targets = np.where(same, tok[1:], IGNORE)
  return tok[:-1].astype(np.int32), targets.astype(np.int32), sg[:-1].astype(np.int32)


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, pad_id: int):
  """One row from whole documents (each already ending in EOS), in order; cut at seq_len+1 tokens."""
  lens = [int(d.size) for d in docs]
  tokens = np.concatenate(docs) if docs else np.zeros(0, np.int64)
  seg = np.repeat(np.arange(1, len(docs) + 1), lens)
  return row_from_tokens(tokens, seg, seq_len, pad_id)


def prompt_answer_row(prompt_ids: np.ndarray, answer_ids: np.ndarray, seq_len: int, pad_id: int,
                      prompt_loss: bool = False):
  """Row for a question-answering example: targets only where the next token is an answer token, or,
  with `prompt_loss`, on every next token of prompt + answer (language-model loss on the whole row).

  The sequence is prompt + answer; if it is longer than seq_len + 1 tokens, the *start* of the prompt is
  dropped so that the question and answer always survive [ours]. Returns (inputs, targets,
  segment_ids, answer_start), where answer_start is the input position whose target is the first
  answer token.
  """
  prompt_ids = np.asarray(prompt_ids, np.int64)
  answer_ids = np.asarray(answer_ids, np.int64)
  seq = np.concatenate([prompt_ids, answer_ids])
  is_answer = np.concatenate([np.zeros(prompt_ids.size, bool), np.ones(answer_ids.size, bool)])
  if seq.size > seq_len + 1:
    seq, is_answer = seq[-(seq_len + 1):], is_answer[-(seq_len + 1):]
  n = seq.size
  tok = np.full(seq_len + 1, pad_id, np.int64)
  tok[:n] = seq
  tgt_mask = np.zeros(seq_len + 1, bool)
  tgt_mask[:n] = is_answer
  loss_mask = np.arange(seq_len + 1) < n if prompt_loss else tgt_mask
  targets = np.where(loss_mask[1:], tok[1:], IGNORE)
  seg = np.zeros(seq_len, np.int64)
  seg[: min(n, seq_len)] = 1
  answer_start = int(np.argmax(tgt_mask[1:])) if tgt_mask[1:].any() else -1
  return tok[:-1].astype(np.int32), targets.astype(np.int32), seg.astype(np.int32), answer_start


def _stack(rows) -> dict[str, np.ndarray]:
  return {"inputs": np.stack([r[0] for r in rows]), "targets": np.stack([r[1] for r in rows]),
          "segment_ids": np.stack([r[2] for r in rows])}


def _epoch_positions(step: int, batch_size: int, rows_per_epoch: int, rows=None):
  r = row_range(rows, batch_size)
  g = step * batch_size + np.arange(r.start, r.stop, dtype=np.int64)
  return g // rows_per_epoch, g % rows_per_epoch


# ---------------------------------------------------------------------------------------------------
# In-memory documents (local text files, the embedded Shakespeare corpus).


def read_documents(paths: Sequence[str], doc_separator: str | None = None) -> list[tuple[str, bytes]]:
  """(origin, raw bytes) of each document of local files: one per file, or, with `doc_separator`,
  the file's pieces between separators (whitespace-only pieces dropped). Nothing is decoded here."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  docs = []
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"no such text file {str(p)!r}")
    with open(p, "rb") as f:
      data = f.read()
    if doc_separator:
      pieces = data.split(doc_separator.encode("utf-8"))
      docs += [(f"{str(p)!r} (document {i})", d) for i, d in enumerate(pieces) if d.strip()]
    elif data.strip():
      docs.append((repr(str(p)), data))
  return docs


class _Windows:
  """Documents (tokens, each ending in EOS) as one stream cut into windows of seq_len + 1 tokens with
  stride seq_len: every token but the first is a target exactly once."""

  def __init__(self, docs: Sequence[np.ndarray], seq_len: int, pad_id: int):
    self.seq_len, self.pad_id = seq_len, pad_id
    self.tokens = np.concatenate(docs).astype(np.int32)
    # doc_starts[j] = stream offset of document j: the document of position p is found by search.
    self.doc_starts = np.cumsum([0] + [d.size for d in docs[:-1]]).astype(np.int64)
    self.num_windows = (self.tokens.size - 1) // seq_len

  def row(self, w: int):
    start = w * self.seq_len
    tokens = self.tokens[start:start + self.seq_len + 1]
    doc = np.searchsorted(self.doc_starts, np.arange(start, start + tokens.size), side="right") - 1
    return row_from_tokens(tokens, doc - doc[0] + 1, self.seq_len, self.pad_id)


class DocumentSource:
  """Documents held in memory as a packed (or one-document-per-row) language-modelling stream, with
  an optional held-out split for evaluation.

  `documents` and `eval_documents` are (origin, raw bytes) pairs, tokenized once at construction by
  `tokenizer.encode_document` (raw bytes for the byte tokenizer; strict UTF-8 text, or a one-line
  error naming the origin, for the others) and held as int32 (4 bytes per token): meant for corpora up
  to a few hundred MB; use TFDS for more.

  pack=True: the token stream (documents + EOS, in order) is cut into windows of seq_len + 1 tokens
  with stride seq_len, so every token except the first is a target exactly once per epoch; windows are
  shuffled per epoch. pack=False: one document per row, truncated to seq_len + 1 tokens and padded
  (segment 0, target -100).

  `eval_set(n)` holds n fixed rows of the held-out documents (laid out as the training rows), spread
  evenly over the held-out stream, with the UTF-8 bytes of each row's targets for bits per byte.
  """

  lm_eval = True  # the training loop reports loss, bits per byte and perplexity on eval_set rows

  def __init__(self, documents: Sequence[tuple[str, bytes]], *, seq_len: int, batch_size: int,
               tokenizer, seed: int = 0, pack: bool = True,
               eval_documents: Sequence[tuple[str, bytes]] = (), name: str = "text"):
    self.name = name
    self.seq_len, self.batch_size, self.seed, self.pack = int(seq_len), int(batch_size), seed, pack
    self.tokenizer = tokenizer
    self.vocab_size = int(tokenizer.vocab_size)
    docs = self._tokenize(documents)
    if not docs:
      raise ValueError(f"{name}: no text to train on")
    if pack:
      self._train = _Windows(docs, self.seq_len, tokenizer.pad_id)
      self.rows_per_epoch = self._train.num_windows
      if self.rows_per_epoch < 1:
        raise ValueError(f"{name}: {self._train.tokens.size} tokens cannot fill one row of "
                         f"seq_len={self.seq_len}; add text or lower data.seq_len")
    else:
      self._docs = docs
      self.rows_per_epoch = len(docs)
    self.num_documents = len(docs)
    self._eval_docs = self._tokenize(eval_documents) or None

  def _tokenize(self, documents) -> list[np.ndarray]:
    from memarch.data.tokenizer import encode_document  # pylint: disable=import-outside-toplevel
    eos = np.asarray([self.tokenizer.eos_id], np.int32)
    return [np.concatenate([encode_document(self.tokenizer, data, origin), eos])
            for origin, data in documents]

  @property
  def token_bytes(self) -> np.ndarray:
    return self.tokenizer.token_bytes

  def row(self, epoch: int, position: int):
    w = int(permute_indices(position, self.rows_per_epoch, self.seed, epoch))
    if not self.pack:
      d = self._docs[w]
      return pack_documents([d[: self.seq_len + 1]], self.seq_len, self.tokenizer.pad_id)
    return self._train.row(w)

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    epochs, positions = _epoch_positions(step, self.batch_size, self.rows_per_epoch, rows)
    return _stack([self.row(int(e), int(p)) for e, p in zip(epochs, positions)])

  def eval_documents(self) -> list[np.ndarray] | None:
    """Tokens of each held-out document, EOS included (None without a held-out split)."""
    return None if self._eval_docs is None else list(self._eval_docs)

  def eval_set(self, n: int) -> dict[str, np.ndarray] | None:
    """n fixed held-out rows (fewer if the split is shorter), or None without a held-out split."""
    if self._eval_docs is None or n < 1:
      return None
    pad = self.tokenizer.pad_id
    if self.pack:
      windows = _Windows(self._eval_docs, self.seq_len, pad)
      if windows.num_windows < 1:  # a held-out split shorter than a row: one padded row
        rows = [pack_documents(self._eval_docs, self.seq_len, pad)]
      else:
        rows = [windows.row(int(w)) for w in _spread(n, windows.num_windows)]
    else:
      rows = [pack_documents([self._eval_docs[int(i)][: self.seq_len + 1]], self.seq_len, pad)
              for i in _spread(n, len(self._eval_docs))]
    out = _stack(rows)
    out["target_bytes"] = target_bytes(out["targets"], self.token_bytes)
    return out


def _spread(n: int, total: int) -> np.ndarray:
  """min(n, total) distinct indices spread evenly over [0, total)."""
  return np.unique(np.linspace(0, total - 1, min(int(n), total)).round().astype(np.int64))


def target_bytes(targets: np.ndarray, token_bytes: np.ndarray) -> np.ndarray:
  """UTF-8 bytes of each row's labelled targets (the denominator of bits per byte)."""
  t = np.asarray(targets)
  return np.where(t != IGNORE, np.asarray(token_bytes)[np.where(t != IGNORE, t, 0)], 0).sum(-1)


class LocalTextSource(DocumentSource):
  """Local text files (read as bytes) as a `DocumentSource`; `eval_paths` are the held-out split.

  Each file is one document, or, with `doc_separator` (e.g. "\\n\\n"), split into documents on it
  (empty pieces dropped).
  """

  def __init__(self, paths: Sequence[str], *, seq_len: int, batch_size: int, tokenizer, seed: int = 0,
               pack: bool = True, doc_separator: str | None = None, eval_paths: Sequence[str] = ()):
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    if not paths:
      raise ValueError("LocalTextSource needs at least one text file")
    try:
      docs = read_documents(paths, doc_separator)
      eval_docs = read_documents(eval_paths, doc_separator) if eval_paths else []
    except FileNotFoundError as e:
      raise FileNotFoundError(f"LocalTextSource: {e}") from None
    if not docs:
      raise ValueError(f"LocalTextSource: the files {list(map(str, paths))} hold no text")
    super().__init__(docs, seq_len=seq_len, batch_size=batch_size, tokenizer=tokenizer, seed=seed,
                     pack=pack, eval_documents=eval_docs, name="LocalTextSource")


# ---------------------------------------------------------------------------------------------------
# TFDS (random access through `tfds.data_source`, no TensorFlow).


def _tfds_root(tfds, data_dir) -> str:
  if data_dir:
    return str(data_dir)
  return os.environ.get("TFDS_DATA_DIR", tfds.core.constants.DATA_DIR)


def open_tfds_source(name: str, split: str, data_dir: str | None):
  """`tfds.data_source(..., download=False)` with one-line errors for unknown and unprepared sets.

  download=False matters: by default `tfds.data_source` starts downloading and preparing a missing set.
  Under `tfds.testing.mock_data` the builder reports "not prepared" yet the data source works, so the
  preparedness check runs only after the open fails.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("TFDSTextSource needs tensorflow-datasets (pip install tensorflow-datasets); "
                      "TensorFlow itself is not needed") from e
  root = _tfds_root(tfds, data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"TFDS has no dataset named {name!r} (set data.tfds_name to a registered "
                     "TFDS text dataset such as lm1b, pg19 or tiny_shakespeare)") from None
  except Exception as e:  # pylint: disable=broad-except
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except
      prepared = False
    if prepared:
      raise
    raise ValueError(f"TFDS dataset {name!r} is not prepared in {root}; prepare it with "
                     f"'tfds build {name} --data_dir={root} --file_format=array_record' or set "
                     "data.name=mqar") from e


class TFDSTextSource:
  """A TFDS text dataset read by random access (`tfds.data_source`; ArrayRecord, no TensorFlow).

  Documents are tokenized on demand, never all at once. pack=True: a row takes a block of k documents
  at consecutive permuted positions (epoch e, row r -> documents perm_e(r*k .. r*k+k-1)), joined with
  EOS and cut at seq_len + 1 tokens (the tail of the last document is dropped; a short block is
  padded). k = `docs_per_row`, or by default ceil((seq_len + 1) / mean tokens per document) over a
  seeded sample of 64 documents, so rows are full on average [ours]. Every document is used once per
  epoch (the last len % k positions of a permutation are skipped). With k = 1 (documents longer than a
  row, e.g. pg19 books) a row is a random seq_len + 1 crop of the document, drawn per (seed, epoch, row),
  so successive epochs see different parts of each book [ours]. pack=False: the first seq_len + 1
  tokens of one document per row, padded.

  `text_key` names the text feature. Byte strings go to the byte tokenizer as they are; tokenizers
  that need text get strict UTF-8 (a record that is not valid UTF-8 fails with one line naming it).
  `eval_source`, another TFDSTextSource on the held-out split (data.tfds_eval_split), gives
  `eval_set`.
  """

  lm_eval = True

  SAMPLE_DOCS = 64

  def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
               text_key: str = "text", seq_len: int, batch_size: int, tokenizer, seed: int = 0,
               pack: bool = True, docs_per_row: int | None = None):
    self.name, self.split, self.text_key = name, split, text_key
    self.seq_len, self.batch_size, self.seed, self.pack = int(seq_len), int(batch_size), seed, pack
    self.tokenizer = tokenizer
    self.vocab_size = int(tokenizer.vocab_size)
    self._eos = np.asarray([tokenizer.eos_id], np.int32)
    self._source = open_tfds_source(name, split, data_dir)
    self.num_documents = len(self._source)
    if self.num_documents == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
    if not pack:
      self.docs_per_row = 1
    elif docs_per_row:
      self.docs_per_row = int(docs_per_row)
    else:
      m = min(self.SAMPLE_DOCS, self.num_documents)
      sample = permute_indices(np.arange(m), self.num_documents, seed, -1)
      mean_len = np.mean([self.document(int(i)).size for i in sample])
      self.docs_per_row = max(1, math.ceil((self.seq_len + 1) / mean_len))
    self.docs_per_row = min(self.docs_per_row, self.num_documents)
    self.rows_per_epoch = self.num_documents // self.docs_per_row
    self.eval_source: TFDSTextSource | None = None

  def _value(self, i: int):
    record = self._source[int(i)]
    if self.text_key not in record:
      raise KeyError(f"TFDS dataset {self.name!r} has no feature {self.text_key!r}; its features are "
                     f"{sorted(record)} (set data.text_key)")
    value = record[self.text_key]
    return value.item() if isinstance(value, np.ndarray) else value

  def _origin(self, i: int) -> str:
    return f"TFDS {self.name!r} split {self.split!r} record {int(i)}"

  def text(self, i: int) -> str:
    from memarch.data.tokenizer import decode_utf8  # pylint: disable=import-outside-toplevel
    value = self._value(i)
    return decode_utf8(value, self._origin(i)) if isinstance(value, bytes) else str(value)

  def document(self, i: int) -> np.ndarray:
    """Tokens of document i followed by EOS."""
    from memarch.data.tokenizer import encode_document  # pylint: disable=import-outside-toplevel
    value = self._value(i)
    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return np.concatenate([encode_document(self.tokenizer, data, self._origin(i)), self._eos])

  @property
  def token_bytes(self) -> np.ndarray:
    return self.tokenizer.token_bytes

  def eval_set(self, n: int) -> dict[str, np.ndarray] | None:
    """n fixed rows of `eval_source` (epoch 0, positions spread over it), or None without one."""
    ev = self.eval_source
    if ev is None or n < 1:
      return None
    out = _stack([ev.row(0, int(p)) for p in _spread(n, ev.rows_per_epoch)])
    out["target_bytes"] = target_bytes(out["targets"], self.token_bytes)
    return out

  def row(self, epoch: int, position: int):
    k = self.docs_per_row
    ids = permute_indices(np.arange(position * k, position * k + k), self.num_documents, self.seed,
                          epoch)
    docs = [self.document(int(i)) for i in ids]
    if self.pack and k == 1 and docs[0].size > self.seq_len + 1:
      rng = np.random.default_rng([self.seed & _MASK64, epoch, position, 0xC209])
      offset = int(rng.integers(0, docs[0].size - self.seq_len))
      docs = [docs[0][offset:offset + self.seq_len + 1]]
    return pack_documents(docs, self.seq_len, self.tokenizer.pad_id)

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    epochs, positions = _epoch_positions(step, self.batch_size, self.rows_per_epoch, rows)
    return _stack([self.row(int(e), int(p)) for e, p in zip(epochs, positions)])
