"""Passkey and S-NIAH-1 generators and their training sources."""
import re

import numpy as np
import pytest

from memarch.data import needle as nd
from memarch.data.tokenizer import ByteTokenizer
from memarch.evals.metrics import passkey_match, string_match_all

TOK = ByteTokenizer()
FILLER_UNIT = len(nd.PASSKEY_FILLER) + 1


@pytest.mark.parametrize("length", [300, 512, 1024, 4096])
def test_passkey_structure_and_length(length):
  for index, depth in ((0, 0.0), (1, 0.3), (2, 1.0)):
    ex = nd.make_passkey(length, depth, index, seed=4)
    k = ex["passkey"]
    assert 1 <= k <= nd.MAX_PASSKEY and ex["answer"] == str(k)
    lines = ex["context"].split("\n")
    assert lines[0] == nd.PASSKEY_INTRO
    key_line = f"The pass key is {k}. Remember it. {k} is the pass key."
    assert lines.count(key_line) == 1
    n = ex["n_prefix"] + ex["n_suffix"]
    assert lines.index(key_line) == 1 + ex["n_prefix"] and len(lines) == n + 2
    assert all(l == nd.PASSKEY_FILLER for l in lines[1:] if l != key_line)
    assert ex["prompt"] == ex["context"] + "\n" + nd.PASSKEY_QUESTION + " "
    assert ex["num_tokens"] == len(TOK.encode(ex["prompt"]))
    assert length - FILLER_UNIT < ex["num_tokens"] <= length     # the largest haystack that fits
    assert n == 0 or abs(ex["depth"] - depth) <= 0.5 / n + 1e-9
    assert passkey_match(" " + ex["answer"] + ".", k)


def test_passkey_determinism():
  a = nd.make_passkey(1024, 0.5, 3, seed=1)
  assert a == nd.make_passkey(1024, 0.5, 3, seed=1)
  keys = {nd.make_passkey(512, 0.5, i)["passkey"] for i in range(40)}
  assert len(keys) >= 38
  assert nd.make_passkey(512, 0.5, 3, seed=1)["passkey"] != nd.make_passkey(512, 0.5, 3, seed=2)[
      "passkey"]
  with pytest.raises(ValueError, match="depth"):
    nd.make_passkey(512, 1.5, 0)
  with pytest.raises(ValueError, match="too short"):
    nd.make_passkey(100, 0.5, 0)
  with pytest.raises(ValueError, match="too short"):
    nd.make_niah(256, 0.5, 0)


_NEEDLE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")


@pytest.mark.parametrize("length", [768, 1024, 4096])
@pytest.mark.parametrize("num_needles,num_queries", [(1, 1), (4, 1), (4, 4)])
def test_niah_structure(length, num_needles, num_queries):
  ex = nd.make_niah(length, 0.5, 7, num_needles=num_needles, num_queries=num_queries, seed=2)
  found = _NEEDLE.findall(ex["context"])
  assert dict(found) == dict(zip(ex["keys"], ex["values"])) and len(found) == num_needles
  assert len(set(ex["keys"])) == num_needles
  assert ex["golds"] == ex["values"][:num_queries] and ex["answer"] == ", ".join(ex["golds"])
  for key in ex["keys"][:num_queries]:
    assert key in ex["question"]
  for key in ex["keys"][num_queries:]:
    assert key not in ex["question"]
  haystack = " ".join(_NEEDLE.sub("", ex["context"]).split()).replace(". ", ".|").split("|")
  assert [h for h in haystack if h] == [
      nd.NOISE_SENTENCES[i % 5] for i in range(ex["num_sentences"])]
  assert ex["prompt"].startswith(nd.NIAH_INTRO + "\n" + ex["context"] + "\n" + ex["question"])
  assert ex["num_tokens"] == len(TOK.encode(ex["prompt"]))
  assert length - 23 < ex["num_tokens"] <= length
  assert string_match_all(ex["answer"], ex["golds"]) == 1.0


def test_niah_depth_controls_position():
  m_first = nd.make_niah(2048, 0.0, 1)
  m_last = nd.make_niah(2048, 1.0, 1)
  m_mid = nd.make_niah(2048, 0.5, 1)
  assert m_first["context"].startswith("One of the special magic numbers")
  assert m_last["context"].endswith(f"is: {m_last['values'][0]}.")
  pos = m_mid["context"].find("One of the special")
  assert abs(pos / len(m_mid["context"]) - 0.5) < 0.05 and abs(m_mid["depth"] - 0.5) < 0.02
  ex = nd.make_niah(2048, [0.1, 0.9], 1, num_needles=2, num_queries=2)
  p0, p1 = (ex["context"].find(v) for v in ex["values"])
  assert p0 < p1 and ex["needle_depths"][0] == pytest.approx(0.1, abs=0.02)
  with pytest.raises(ValueError):
    nd.make_niah(512, [0.1], 0, num_needles=2)
  with pytest.raises(ValueError):
    nd.make_niah(512, 0.5, 0, num_needles=2, num_queries=3)


@pytest.mark.parametrize("cls,kw", [(nd.PasskeySource, {}),
                                    (nd.NIAHSource, {"num_needles": 2, "num_queries": 2})])
def test_sources_rows(cls, kw):
  src = cls(512, batch_size=4, seed=9, **kw)
  assert src.vocab_size == 259
  b = src.batch(5)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      k: ((4, 512), np.int32) for k in ("inputs", "targets", "segment_ids")}
  depths = []
  for r in range(4):
    ex = src.example(5 * 4 + r)
    depths.append(ex["depth"])
    x, y = b["inputs"][r], b["targets"][r]
    mask = y != -100
    assert TOK.decode(y[mask]) == ex["answer"] and mask.sum() == len(ex["answer"])
    start = int(np.argmax(mask))
    assert TOK.decode(x[:start + 1]) == ex["prompt"]            # the prompt is never truncated
    assert len(ex["prompt"]) + len(ex["answer"]) <= 513
  assert len(set(depths)) > 1                                    # depth varies across examples
  np.testing.assert_array_equal(cls(512, batch_size=4, seed=9, **kw).batch(5)["inputs"], b["inputs"])
  fixed = cls(512, batch_size=2, depth=0.0, **kw)
  assert all(fixed.example(i)["depth"] == 0.0 for i in range(2))


def test_prompt_loss_targets_every_next_token():
  answer_only = nd.PasskeySource(512, batch_size=2, seed=3).batch(0)
  lm = nd.PasskeySource(512, batch_size=2, seed=3, prompt_loss=True).batch(0)
  np.testing.assert_array_equal(lm["inputs"], answer_only["inputs"])
  for r in range(2):
    x, y, seg = lm["inputs"][r], lm["targets"][r], lm["segment_ids"][r]
    n = int(seg.sum())                                  # real tokens; the rest is padding
    np.testing.assert_array_equal(y[:n - 1], x[1:n])    # next-token targets over the whole prompt
    assert (y[n - 1:] == -100).all()                   # the last token has no next token
    a = answer_only["targets"][r]
    np.testing.assert_array_equal(y[a != -100], a[a != -100])  # the answer targets are unchanged
    assert (y != -100).sum() == n - 1 > (a != -100).sum()


def test_landmark_layout_rows():
  plain = nd.PasskeySource(480, batch_size=2, seed=4)
  src = nd.PasskeySource(512, batch_size=2, seed=4, landmark_block=16)
  assert src.vocab_size == plain.vocab_size + 1 and src.landmark_id == plain.vocab_size
  b, p = src.batch(1), plain.batch(1)
  x, y = b["inputs"], b["targets"]
  assert x.shape == (2, 512)
  is_lmk = np.arange(512) % 16 == 15
  assert (x[:, is_lmk] == src.landmark_id).all() and (x[:, ~is_lmk] != src.landmark_id).all()
  assert (y[:, is_lmk] == -100).all()
  # Content positions hold the plain 480-token rows; the token before a landmark predicts the
  # content token after it.
  np.testing.assert_array_equal(x[:, ~is_lmk], p["inputs"])
  np.testing.assert_array_equal(y[:, ~is_lmk], p["targets"])
  for r in range(2):
    real = int(p["segment_ids"][r].sum())
    last = (real - 1) + (real - 1) // 15
    assert b["segment_ids"][r, last] == 1 and b["segment_ids"][r, last + 1:].sum() == 0
  with pytest.raises(ValueError, match="divide seq_len"):
    nd.PasskeySource(500, batch_size=1, landmark_block=16)
  from memarch import configs_lib
  from memarch.data import make_source
  cfg = configs_lib.base_config("tiny")
  cfg.data.landmark_block = 16  # MQAR rows have no landmark layout: refused, not ignored
  with pytest.raises(ValueError, match="landmark_block"):
    make_source(cfg.data, seed=0)
