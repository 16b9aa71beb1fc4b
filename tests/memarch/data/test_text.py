"""Text sources: seeded lazy permutation, exact packing of local files, TFDS via mock_data, errors."""
import numpy as np
import pytest

from memarch.data import text
from memarch.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS = TOK.eos_id


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permute_indices_is_a_seeded_bijection(n):
  p0 = text.permute_indices(np.arange(n), n, seed=3, epoch=0)
  np.testing.assert_array_equal(np.sort(p0), np.arange(n))
  np.testing.assert_array_equal(p0, text.permute_indices(np.arange(n), n, seed=3, epoch=0))
  assert int(text.permute_indices(n - 1, n, 3, 0)) == p0[-1]
  if n >= 64:
    p1 = text.permute_indices(np.arange(n), n, seed=3, epoch=1)
    p2 = text.permute_indices(np.arange(n), n, seed=4, epoch=0)
    assert (p0 != p1).mean() > 0.9 and (p0 != p2).mean() > 0.9
    assert (p0 != np.arange(n)).mean() > 0.9
  with pytest.raises(ValueError):
    text.permute_indices(n, n, 0, 0)


def _check_row_invariants(b, seq_len, batch_size):
  for k in ("inputs", "targets", "segment_ids"):
    assert b[k].shape == (batch_size, seq_len) and b[k].dtype == np.int32
  x, y, s = b["inputs"], b["targets"], b["segment_ids"]
  valid = y != text.IGNORE
  # A target is the next input token, and only inside one nonzero segment.
  nxt_same = (s[:, :-1] == s[:, 1:]) & (s[:, 1:] != 0)
  np.testing.assert_array_equal(valid[:, :-1], nxt_same)
  np.testing.assert_array_equal(y[:, :-1][valid[:, :-1]], x[:, 1:][valid[:, :-1]])
  for row in s:
    real = row[row > 0]
    assert real[0] == 1 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
    assert np.all(row[len(real):] == 0)                       # padding only at the end


DOCS = ["alpha beta gamma delta.", "the second document is a little longer than the first.",
        "short", "fourth doc\nwith two lines"]


def _write(tmp_path):
  paths = []
  for i, d in enumerate(DOCS):
    p = tmp_path / f"doc{i}.txt"
    p.write_text(d, encoding="utf-8")
    paths.append(str(p))
  return paths


def test_local_packed_covers_the_stream_once_per_epoch(tmp_path):
  paths, seq_len, bs = _write(tmp_path), 8, 2
  src = text.LocalTextSource(paths, seq_len=seq_len, batch_size=bs, tokenizer=TOK, seed=5)
  stream = np.concatenate([np.append(TOK.encode(d), EOS) for d in DOCS])
  n_rows = (len(stream) - 1) // seq_len
  assert src.rows_per_epoch == n_rows and src.vocab_size == 259
  expected = sorted(tuple(stream[w * seq_len:(w + 1) * seq_len]) for w in range(n_rows))
  steps = -(-n_rows // bs)
  rows = []
  for step in range(steps):
    b = src.batch(step)
    _check_row_invariants(b, seq_len, bs)
    rows += [tuple(r) for r in b["inputs"]]
  assert sorted(rows[:n_rows]) == expected
  # Next epoch: the same windows in another order; a fresh source reproduces any step (resume).
  again = text.LocalTextSource(paths, seq_len=seq_len, batch_size=bs, tokenizer=TOK, seed=5)
  for step in (0, steps + 1, 17):
    for k, v in src.batch(step).items():
      np.testing.assert_array_equal(v, again.batch(step)[k])
  other = text.LocalTextSource(paths, seq_len=seq_len, batch_size=bs, tokenizer=TOK, seed=6)
  assert any(not np.array_equal(src.batch(s)["inputs"], other.batch(s)["inputs"]) for s in range(3))


def test_local_packed_boundary_rule(tmp_path):
  paths = _write(tmp_path)
  src = text.LocalTextSource(paths, seq_len=110, batch_size=1, tokenizer=TOK)
  b = src.batch(0)
  x, y, s = b["inputs"][0], b["targets"][0], b["segment_ids"][0]
  eos_pos = np.flatnonzero(x == EOS)
  assert len(eos_pos) == 3 and s.max() == 4            # 4 docs; the last EOS is only a target
  for p in eos_pos:
    assert y[p - 1] == EOS                              # the last token of a document predicts EOS
    assert y[p] == text.IGNORE and s[p + 1] == s[p] + 1  # nothing predicted across the boundary
  assert TOK.decode(x[s == 2]) == DOCS[1] and y[-1] == EOS


def test_local_unpacked_and_separator(tmp_path):
  p = tmp_path / "corpus.txt"
  p.write_text("first paragraph here\n\nsecond one\n\n\n\nthird paragraph, a longer one", "utf-8")
  src = text.LocalTextSource([str(p)], seq_len=12, batch_size=3, tokenizer=TOK, pack=False,
                             doc_separator="\n\n")
  assert src.num_documents == 3 and src.rows_per_epoch == 3
  b = src.batch(0)
  _check_row_invariants(b, 12, 3)
  firsts = sorted(TOK.decode(r[s == 1]) for r, s in zip(b["inputs"], b["segment_ids"]))
  assert firsts == sorted(["first paragr", "second one", "third paragr"])
  assert all(s.max() == 1 for s in b["segment_ids"])
  short = b["segment_ids"][[TOK.decode(r[:6]) == "second" for r in b["inputs"]]][0]
  assert short.sum() == len("second one") + 1         # text + EOS, then padding


def test_local_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    text.LocalTextSource([str(tmp_path / "nope.txt")], seq_len=8, batch_size=1, tokenizer=TOK)
  p = tmp_path / "tiny.txt"
  p.write_text("abc", "utf-8")
  with pytest.raises(ValueError, match="cannot fill one row"):
    text.LocalTextSource([str(p)], seq_len=64, batch_size=1, tokenizer=TOK)


def test_local_files_are_read_as_raw_bytes(tmp_path):
  # Latin-1 bytes (not UTF-8) and CRLF line ends: the byte tokenizer sees them unchanged (no U+FFFD,
  # whose UTF-8 bytes are EF BF BD, and no newline translation).
  raw = b"caf\xe9 au lait\r\nsecond line \xff end\r\n" * 3
  p = tmp_path / "latin1.txt"
  p.write_bytes(raw)
  src = text.LocalTextSource([str(p)], seq_len=16, batch_size=2, tokenizer=TOK)
  np.testing.assert_array_equal(src._train.tokens, np.append(np.frombuffer(raw, np.uint8), EOS))
  stream = src._train.tokens.astype(np.uint8).tobytes()
  assert b"\xef\xbf\xbd" not in stream and b"\r\n" in stream


def test_text_tokenizer_refuses_invalid_utf8_in_one_line(tmp_path):
  from memarch.data.tokenizer import train_bpe
  bpe = train_bpe(["plain ascii text for a tiny vocabulary"], 270)
  good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
  good.write_text("perfectly good text " * 4, "utf-8")
  bad.write_bytes(b"fine so far \xff\xfe then broken")
  with pytest.raises(ValueError) as e:
    text.LocalTextSource([str(good), str(bad)], seq_len=8, batch_size=1, tokenizer=bpe)
  msg = str(e.value)
  assert "\n" not in msg and "bad.txt" in msg and "not valid UTF-8" in msg and "byte 12" in msg
  src = text.LocalTextSource([str(good)], seq_len=8, batch_size=1, tokenizer=bpe)
  assert bpe.decode(src._train.tokens) == "perfectly good text " * 4


def test_local_eval_paths_give_fixed_held_out_rows(tmp_path):
  paths = _write(tmp_path)
  held = tmp_path / "held.txt"
  held.write_text("held-out text, never trained on: " * 5, "utf-8")
  src = text.LocalTextSource(paths, seq_len=16, batch_size=2, tokenizer=TOK, eval_paths=[str(held)])
  ev = src.eval_set(3)
  assert ev["inputs"].shape == (3, 16) and src.eval_set(3)["inputs"].tolist() == ev["inputs"].tolist()
  assert all(TOK.decode(x) in held.read_text() for x in ev["inputs"])
  np.testing.assert_array_equal(ev["target_bytes"], (ev["targets"] != text.IGNORE).sum(-1)
                                - (ev["targets"] == EOS).sum(-1))
  assert text.LocalTextSource(paths, seq_len=16, batch_size=2, tokenizer=TOK).eval_set(3) is None


def test_prompt_answer_row():
  x, y, s, start = text.prompt_answer_row(np.arange(10, 16), np.array([7, 8]), 10, pad_id=0)
  np.testing.assert_array_equal(x, [10, 11, 12, 13, 14, 15, 7, 8, 0, 0])
  np.testing.assert_array_equal(y, [-100] * 5 + [7, 8] + [-100] * 3)
  np.testing.assert_array_equal(s, [1] * 8 + [0, 0])
  assert start == 5
  # Too long: the prompt loses its start, the answer survives.
  x, y, s, start = text.prompt_answer_row(np.arange(10, 20), np.array([7, 8]), 6, pad_id=0)
  np.testing.assert_array_equal(x, [15, 16, 17, 18, 19, 7])
  np.testing.assert_array_equal(y, [-100] * 4 + [7, 8])
  assert s.min() == 1 and start == 4


tfds = pytest.importorskip("tensorflow_datasets")


def test_tfds_mock_lm1b_packed_and_cropped():
  with tfds.testing.mock_data(num_examples=24):
    docs = {t["text"] if isinstance(t["text"], str) else t["text"].decode()
            for t in tfds.data_source("lm1b", split="train", download=False)}
    src = text.TFDSTextSource("lm1b", split="train", seq_len=48, batch_size=4, tokenizer=TOK, seed=1)
    assert src.num_documents == 24 and src.docs_per_row >= 2 and src.vocab_size == 259
    b = src.batch(3)
    _check_row_invariants(b, 48, 4)
    for x, s in zip(b["inputs"], b["segment_ids"]):
      for seg in range(1, s.max() + 1):
        piece = x[s == seg]
        whole = piece[-1] == EOS
        body = TOK.decode(piece[:-1] if whole else piece)
        assert (body in docs) if whole else any(d.startswith(body) for d in docs)
    again = text.TFDSTextSource("lm1b", split="train", seq_len=48, batch_size=4, tokenizer=TOK, seed=1)
    np.testing.assert_array_equal(again.batch(3)["inputs"], b["inputs"])
    # Documents longer than a row: one random crop per row.
    crop = text.TFDSTextSource("lm1b", seq_len=6, batch_size=8, tokenizer=TOK, seed=2)
    assert crop.docs_per_row == 1
    bc = crop.batch(0)
    _check_row_invariants(bc, 6, 8)
    prefixes = 0
    for x, y in zip(bc["inputs"], bc["targets"]):
      window = TOK.decode(np.append(x, y[-1]) if y[-1] != text.IGNORE else x)
      assert any(window in d for d in docs)
      prefixes += any(d.startswith(window) for d in docs)
    assert prefixes < 8                                     # crops start at random offsets


def test_tfds_not_prepared_is_one_clear_error(tmp_path):
  with pytest.raises(ValueError) as e:
    text.TFDSTextSource("lm1b", data_dir=str(tmp_path), seq_len=8, batch_size=1, tokenizer=TOK)
  msg = str(e.value)
  assert "\n" not in msg and "not prepared" in msg and f"tfds build lm1b --data_dir={tmp_path}" in msg
  assert "data.name=mqar" in msg
  assert not any(tmp_path.iterdir())                      # nothing was downloaded or created
  with pytest.raises(ValueError, match="no dataset named"):
    text.TFDSTextSource("no_such_dataset_xyz", data_dir=str(tmp_path), seq_len=8, batch_size=1,
                        tokenizer=TOK)


def test_tfds_eval_split_and_bpe_sample(tmp_path):
  pytest.importorskip("tokenizers")
  from memarch import configs_lib
  from memarch.data import make_source
  c = configs_lib.base_config("tiny").data
  c.update(dict(name="tfds", tfds_name="lm1b", tfds_eval_split="test", seq_len=24, batch_size=2,
                tokenizer="bpe", vocab_size=280, eval_rows=3))
  with tfds.testing.mock_data(num_examples=12):
    src = make_source(c, seed=0, workdir=str(tmp_path))
    assert (tmp_path / "tokenizer.json").exists() and src.vocab_size <= 280
    ev = src.eval_set(3)
    assert ev["inputs"].shape == (3, 24) and src.eval_source.split == "test"
    np.testing.assert_array_equal(ev["inputs"], src.eval_set(3)["inputs"])
    np.testing.assert_array_equal(ev["target_bytes"], [
        src.tokenizer.token_bytes[t[t != text.IGNORE]].sum() for t in ev["targets"]])
    _check_row_invariants(src.batch(1), 24, 2)
    c.tfds_eval_split = ""
    assert make_source(c, seed=0, workdir=str(tmp_path)).eval_set(3) is None
