"""Tokenizers: byte-level ids and round trips, SentencePiece from a locally trained model, errors."""
import numpy as np
import pytest

from memarch.data import tokenizer as tk


def test_byte_ids_and_roundtrip():
  t = tk.ByteTokenizer()
  assert (t.pad_id, t.bos_id, t.eos_id, t.vocab_size) == (256, 257, 258, 259)
  ids = t.encode("Mary went to the kitchen.")
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids[:4], [77, 97, 114, 121])       # "Mary"
  text = "naïve 東京 — ok"
  ids = t.encode(text)
  assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
  assert t.decode(ids) == text
  assert tk.num_tokens(t, text) == len(ids)


def test_byte_decode_skips_specials_and_replaces_invalid():
  t = tk.ByteTokenizer()
  ids = [t.bos_id] + list(t.encode("ab")) + [t.pad_id, t.eos_id, 999, -1] + list(t.encode("c"))
  assert t.decode(ids) == "abc"
  assert t.decode(np.asarray([104, 105, 0xFF, 33])) == "hi\ufffd!"   # 0xFF is never valid UTF-8


def test_get_tokenizer_errors(tmp_path):
  assert isinstance(tk.get_tokenizer(), tk.ByteTokenizer)
  with pytest.raises(ValueError, match="unknown tokenizer"):
    tk.get_tokenizer("gpt2")
  with pytest.raises(ValueError, match="needs a model path"):
    tk.get_tokenizer("sentencepiece")
  pytest.importorskip("sentencepiece")
  with pytest.raises(FileNotFoundError, match="not found"):
    tk.get_tokenizer("sentencepiece", str(tmp_path / "missing.model"))


def train_tiny_spm(tmp_path, vocab_size=400):
  spm = pytest.importorskip("sentencepiece")
  from memarch.data import babilong
  lines = [babilong.make_example(t, 0, i)["context"] for t in babilong.TASKS for i in range(6)]
  rng = np.random.default_rng(0)
  lines += [babilong.filler_sentence(rng) for _ in range(200)]
  lines += ["The pass key is 12345. Remember it. What is the pass key? 0123456789 naïve"]
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(lines), encoding="utf-8")
  prefix = str(tmp_path / "tiny")
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=vocab_size,
                                 model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                 minloglevel=2)
  return prefix + ".model"


def test_sentencepiece_tokenizer(tmp_path):
  path = train_tiny_spm(tmp_path)
  t = tk.get_tokenizer("sentencepiece", path)
  assert isinstance(t, tk.SentencePieceTokenizer) and t.vocab_size == 400
  assert t.eos_id >= 0 and t.bos_id >= 0 and 0 <= t.pad_id < t.vocab_size
  text = "Daniel journeyed to the office. The quiet river waited."
  ids = t.encode(text)
  assert ids.dtype == np.int32 and 0 < len(ids) < len(text) and ids.max() < t.vocab_size
  assert t.decode(ids) == text
  assert t.decode([t.bos_id] + list(ids) + [t.eos_id]) == text
  assert tk.num_tokens(t, text) == len(ids)
