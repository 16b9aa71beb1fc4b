"""Tokenizers for the text, BABILong-style and needle data: a byte-level default, local SentencePiece
models, and `tokenizer.json` files of the `tokenizers` library (a byte-level BPE trained here, or any
local file).

All expose the same small API: `vocab_size`, `pad_id`, `bos_id`, `eos_id`,
`encode(text) -> np.ndarray[int32]`, `decode(ids) -> str` and `token_bytes` (int64 [vocab_size], the
UTF-8 bytes each id stands for; 0 for specials), which bits per byte needs. The byte tokenizer needs no
files, so the default pipelines (and every test) run offline; the other models are read from local
paths only.

Files are read as bytes. `encode_document` hands raw bytes straight to the byte tokenizer (nothing is
decoded, so no byte is ever replaced by U+FFFD); a tokenizer that needs text gets the bytes decoded
as strict UTF-8, and a file that is not valid UTF-8 is refused with one line naming it.
"""
from __future__ import annotations

import json
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
    return self.encode_bytes(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> np.ndarray:
    """Raw bytes as ids, whatever they hold (valid UTF-8 or not)."""
    return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int32)

  @property
  def token_bytes(self) -> np.ndarray:
    return (np.arange(self.vocab_size) < 256).astype(np.int64)

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

  @property
  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes per piece: "\u2581" counts as the space it stands for, a byte-fallback piece
    <0xNN> as one byte, control and unknown pieces as 0."""
    if not hasattr(self, "_token_bytes"):
      out = np.zeros(self.vocab_size, np.int64)
      for i in range(self.vocab_size):
        if self._sp.is_control(i) or self._sp.is_unknown(i):
          continue
        if self._sp.is_byte(i):
          out[i] = 1
          continue
        out[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
      self._token_bytes = out
    return self._token_bytes

  def decode(self, ids: Iterable[int]) -> str:
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    specials = {self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()}
    keep = [int(i) for i in arr if 0 <= i < self.vocab_size and int(i) not in specials]
    return self._sp.decode(keep)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path!r})"


# Special tokens looked up by name in a tokenizer.json (the first present wins); a BPE trained here has
# the first of each, as ids 0, 1, 2.
_PAD_NAMES = ("<pad>", "[PAD]", "<|padding|>", "<|pad|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
BPE_SPECIALS = (_PAD_NAMES[0], _BOS_NAMES[0], _EOS_NAMES[0])


def _import_tokenizers():
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("BPE / tokenizer.json tokenizers need the `tokenizers` package "
                      "(pip install tokenizers)") from e
  return tokenizers


def _is_byte_level(spec: dict) -> bool:
  """Whether a tokenizer.json maps every character of a token to one byte (GPT-2 style ByteLevel)."""
  def has(node):
    if not isinstance(node, dict):
      return False
    if node.get("type") == "ByteLevel":
      return True
    return any(has(n) for key in ("pretokenizers", "decoders") for n in node.get(key, []) or [])
  return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


class HFTokenizer:
  """A `tokenizer.json` of the `tokenizers` library (imported only here): a byte-level BPE trained by
  `train_bpe`, or any local tokenizer file.

  Special tokens are found by name (<eos>, </s>, <|endoftext|>, ...); without a pad token we pad with
  id 0 (padding is masked by segment id 0 anyway), and a file without any EOS token raises when
  `eos_id` is read, as packing needs one. `encode` adds no special tokens (no post-processor BOS).
  `token_bytes` is exact for byte-level tokenizers (one byte per character of a token); for others it
  is the UTF-8 length of each token decoded alone, an approximation.
  """

  name = "bpe"

  def __init__(self, path: str | None, *, tokenizer=None):
    """Reads `path`; or wraps an in-memory `tokenizers.Tokenizer` (then `path` only names it)."""
    tokenizers = _import_tokenizers()
    self.path = str(path) if path else "<in memory>"
    if tokenizer is not None:
      self._tok = tokenizer
    else:
      if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path!r} (data.tokenizer=bpe trains one "
                                "into the workdir; data.tokenizer=/path/to/tokenizer.json loads one)")
      try:
        self._tok = tokenizers.Tokenizer.from_file(self.path)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{self.path} is not a tokenizer.json the `tokenizers` library can read: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    vocab = self._tok.get_vocab(with_added_tokens=True)
    find = lambda names: next((vocab[n] for n in names if n in vocab), None)  # noqa: E731
    pad, self._eos = find(_PAD_NAMES), find(_EOS_NAMES)
    bos = find(_BOS_NAMES)
    self.pad_id = int(pad) if pad is not None else 0
    self.bos_id = int(bos) if bos is not None else -1

  @property
  def eos_id(self) -> int:
    if self._eos is None:
      raise ValueError(f"tokenizer {self.path!r} has no end-of-document token (one of "
                       f"{', '.join(_EOS_NAMES)}); packing documents needs one")
    return int(self._eos)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    keep = [int(i) for i in arr if 0 <= i < self.vocab_size]
    return self._tok.decode(keep, skip_special_tokens=True)

  @property
  def token_bytes(self) -> np.ndarray:
    if not hasattr(self, "_token_bytes"):
      spec = json.loads(self._tok.to_str())
      specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special", True)}
      byte_level = _is_byte_level(spec)
      out = np.zeros(self.vocab_size, np.int64)
      for i in range(self.vocab_size):
        if i in specials:
          continue
        if byte_level:
          out[i] = len(self._tok.id_to_token(i) or "")
        else:
          out[i] = len(self._tok.decode([i]).encode("utf-8"))
      self._token_bytes = out
    return self._token_bytes

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r})"


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | None = None) -> HFTokenizer:
  """A byte-level BPE of at most `vocab_size` ids (specials <pad>, <bos>, <eos> = 0, 1, 2, then the
  256 byte symbols, then merges) trained on `texts`; saved as `path` (a tokenizer.json), or kept in
  memory when `path` is None. Any text round-trips exactly."""
  tokenizers = _import_tokenizers()
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  minimum = 256 + len(BPE_SPECIALS)
  if vocab_size <= minimum:
    raise ValueError(f"data.vocab_size={vocab_size} is too small for a byte-level BPE: it needs more "
                     f"than {minimum} ids (256 bytes + {len(BPE_SPECIALS)} specials), e.g. 4096")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(BPE_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  if path is None:
    return HFTokenizer(None, tokenizer=tok)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)  # a reader never sees half a file
  return HFTokenizer(path)


def get_tokenizer(name: str = "byte", model_path: str | None = None):
  """`"byte"` -> ByteTokenizer; `"sentencepiece"` (or `"spm"`) -> SentencePieceTokenizer(model_path);
  a path to a `.json` file -> HFTokenizer(path). A BPE to be trained (`"bpe"`) is resolved by
  `memarch.data.make_source`, which knows the workdir and the training split."""
  if name == "byte":
    return ByteTokenizer()
  if name in ("sentencepiece", "spm"):
    if not model_path:
      raise ValueError("tokenizer 'sentencepiece' needs a model path (data.spm_model=/path/to/x.model)")
    return SentencePieceTokenizer(model_path)
  if name == "bpe":
    if not model_path:
      raise ValueError("tokenizer 'bpe' is trained into the training workdir by data.name=text, "
                       "shakespeare or tfds; elsewhere pass data.tokenizer=/path/to/tokenizer.json")
    return HFTokenizer(model_path)
  if str(name).endswith(".json") or os.path.sep in str(name):
    return HFTokenizer(str(name))
  raise ValueError(f"unknown tokenizer {name!r}; choose 'byte', 'sentencepiece', 'bpe' or a path to "
                   "a tokenizer.json")


def decode_utf8(data: bytes, origin: str) -> str:
  """`data` as text, or a one-line ValueError naming `origin` when it is not valid UTF-8."""
  try:
    return bytes(data).decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{origin} is not valid UTF-8 (byte {e.start}: {e.reason}); this tokenizer "
                     "needs text: convert the file to UTF-8 or use data.tokenizer=byte") from None


def encode_document(tokenizer, data: bytes, origin: str) -> np.ndarray:
  """Tokens of a document read as bytes: raw bytes for the byte tokenizer (never decoded), strict
  UTF-8 text for the others (`decode_utf8`)."""
  if isinstance(tokenizer, ByteTokenizer):
    return tokenizer.encode_bytes(data)
  return np.asarray(tokenizer.encode(decode_utf8(data, origin)), np.int32)


def num_tokens(tokenizer, text: str) -> int:
  """Token count of `text`; computed without encoding for the byte tokenizer."""
  if isinstance(tokenizer, ByteTokenizer):
    return len(text.encode("utf-8"))
  return int(len(tokenizer.encode(text)))
