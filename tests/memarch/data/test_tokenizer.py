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


CORPUS = ["When shall we three meet again\nIn thunder, lightning, or in rain?\n",
          "Fair is foul, and foul is fair:\nHover through the fog and filthy air.\n",
          "naïve café, 東京 — and then some\r\n\ttabs and  double  spaces\n"] * 3


def test_bpe_trains_round_trips_and_counts_bytes(tmp_path):
  pytest.importorskip("tokenizers")
  path = tmp_path / "tokenizer.json"
  t = tk.train_bpe(CORPUS, 300, str(path))
  assert path.exists() and t.vocab_size <= 300 and (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
  for text in CORPUS[:3] + ["unseen words: Ophelia! 123 \u00e9\u0301 \U0001F600"]:
    ids = t.encode(text)
    assert ids.dtype == np.int32 and t.decode(ids) == text
    assert t.token_bytes[ids].sum() == len(text.encode("utf-8"))   # exact bytes per token
  assert len(t.encode(CORPUS[0])) < len(CORPUS[0].encode("utf-8"))  # merges were learned
  assert t.token_bytes[[t.pad_id, t.bos_id, t.eos_id]].tolist() == [0, 0, 0]
  again = tk.get_tokenizer(str(path))                                 # any local tokenizer.json
  assert isinstance(again, tk.HFTokenizer) and again.encode(CORPUS[1]).tolist() == t.encode(
      CORPUS[1]).tolist()
  assert tk.get_tokenizer("bpe", str(path)).vocab_size == t.vocab_size
  b = tk.ByteTokenizer()
  assert b.token_bytes[:256].sum() == 256 and b.token_bytes[256:].sum() == 0


def test_bpe_errors(tmp_path):
  pytest.importorskip("tokenizers")
  with pytest.raises(ValueError, match="too small for a byte-level BPE"):
    tk.train_bpe(CORPUS, 256)
  with pytest.raises(ValueError, match="trained into the training workdir"):
    tk.get_tokenizer("bpe")
  with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
    tk.get_tokenizer(str(tmp_path / "missing.json"))
  (tmp_path / "junk.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a tokenizer.json"):
    tk.get_tokenizer(str(tmp_path / "junk.json"))
  import tokenizers
  plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  plain.save(str(tmp_path / "no_eos.json"))
  with pytest.raises(ValueError, match="no end-of-document token"):
    _ = tk.get_tokenizer(str(tmp_path / "no_eos.json")).eos_id


def test_make_source_trains_bpe_into_the_workdir_and_reuses_it(tmp_path):
  pytest.importorskip("tokenizers")
  from memarch import configs_lib
  from memarch.data import make_source
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("".join(CORPUS) * 4, "utf-8")
  c = configs_lib.base_config("tiny").data
  c.update(dict(name="text", paths=(str(corpus),), tokenizer="bpe", vocab_size=300, seq_len=16))
  wd = tmp_path / "work"
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    make_source(c, seed=0, workdir=str(wd), may_train_tokenizer=False)
  src = make_source(c, seed=0, workdir=str(wd))
  saved = wd / "tokenizer.json"
  assert saved.exists() and src.vocab_size == src.tokenizer.vocab_size <= 300
  before = (saved.stat().st_mtime_ns, saved.read_text())
  again = make_source(c, seed=0, workdir=str(wd), may_train_tokenizer=False)   # resume / eval
  assert (saved.stat().st_mtime_ns, saved.read_text()) == before
  np.testing.assert_array_equal(again.batch(3)["inputs"], src.batch(3)["inputs"])
  c.tokenizer = str(saved)                                            # a path loads that file
  np.testing.assert_array_equal(make_source(c, seed=0).batch(3)["inputs"], src.batch(3)["inputs"])


def test_sentencepiece_token_bytes(tmp_path):
  path = train_tiny_spm(tmp_path)
  t = tk.get_tokenizer("sentencepiece", path)
  text = "Daniel journeyed to the office. naïve"
  ids = t.encode(text)
  # SentencePiece adds one "\u2581" (a space) before the first word.
  assert t.token_bytes[ids].sum() == len(text.encode("utf-8")) + 1
  assert t.token_bytes[t.eos_id] == 0
