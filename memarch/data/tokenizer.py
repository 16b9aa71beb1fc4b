"""Tokenizers for the text, BABILong-style and needle data: a byte-level default and local SentencePiece.

Both expose the same small API: `vocab_size`, `pad_id`, `bos_id`, `eos_id`,
`encode(text) -> np.ndarray[int32]` and `decode(ids) -> str`. The byte tokenizer needs no files, so the
default pipelines (and every test) run offline; a SentencePiece model is read from a local path only.
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then the specials pad=256, bos=257, eos=258 (vocab_size 259).

  Encoding is lossless and additive (`len(encode(a + b)) == len(encode(a)) + len(encode(b))`), which
  the generators use to hit a requested length exactly.
  """

  name = "byte"
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Bytes back to text; special and out-of-range ids are skipped, broken UTF-8 becomes U+FFFD."""
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    arr = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
    return arr.tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer:
  """A local SentencePiece model (`.model` file); `sentencepiece` is imported only here.

  Models trained without a pad piece report pad_id -1; padding positions are masked by segment id 0 and
  target -100 anyway, so we pad with id 0 then [ours]. Packing needs an EOS piece: a model without one
  raises when `eos_id` is read.
  """

  name = "sentencepiece"

  def __init__(self, model_path: str):
    try:
      import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("SentencePieceTokenizer needs the `sentencepiece` package: "
                        "pip install 'memarch[sentencepiece]' (or pip install sentencepiece)") from e
    if not model_path or not os.path.isfile(model_path):
      raise FileNotFoundError(f"SentencePiece model file not found: {model_path!r} "
                              "(set data.spm_model to a local .model file)")
    self.model_path = str(model_path)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else 0
    self.bos_id = int(self._sp.bos_id())

  @property
  def eos_id(self) -> int:
    eos = int(self._sp.eos_id())
    if eos < 0:
      raise ValueError(f"SentencePiece model {self.model_path!r} has no EOS piece; packing documents "
                       "needs one (train it with --eos_id=<id>)")
    return eos

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    specials = {self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()}
    keep = [int(i) for i in arr if 0 <= i < self.vocab_size and int(i) not in specials]
    return self._sp.decode(keep)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path!r})"


def get_tokenizer(name: str = "byte", model_path: str | None = None):
  """`"byte"` -> ByteTokenizer; `"sentencepiece"` (or `"spm"`) -> SentencePieceTokenizer(model_path)."""
  if name == "byte":
    return ByteTokenizer()
  if name in ("sentencepiece", "spm"):
    if not model_path:
      raise ValueError("tokenizer 'sentencepiece' needs a model path (data.spm_model=/path/to/x.model)")
    return SentencePieceTokenizer(model_path)
  raise ValueError(f"unknown tokenizer {name!r}; choose 'byte' or 'sentencepiece'")


def num_tokens(tokenizer, text: str) -> int:
  """Token count of `text`; computed without encoding for the byte tokenizer."""
  if isinstance(tokenizer, ByteTokenizer):
    return len(text.encode("utf-8"))
  return int(len(tokenizer.encode(text)))
