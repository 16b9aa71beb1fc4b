"""BABILong-style generator: an independent solver replays every story, plus length, order, label,
determinism and training-row checks."""
import re

import numpy as np
import pytest

from memarch.data import babilong as bl
from memarch.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()

_MOVE = re.compile(r"^(\w+) (?:went to|journeyed to|travelled to|moved to|went back to) the (\w+)\.$")
_GET = re.compile(r"^(\w+) (?:picked up|grabbed|took|got) the (\w+)(?: there)?\.$")
_DROP = re.compile(r"^(\w+) (?:dropped|put down|discarded|left) the (\w+)\.$")
_GIVE = re.compile(r"^(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.$")
_REL = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")
_OPP = {"north": "south", "south": "north", "east": "west", "west": "east"}


def solve(task, facts, question):
  """Answer `question` from `facts` alone by the task's rules; raise if it is not derivable."""
  if task == "qa4":
    rel = set()
    for f in facts:
      a, d, b = _REL.match(f).groups()
      rel |= {(a, d, b), (b, _OPP[d], a)}
    if m := re.match(r"^What is the (\w+) (\w+) of\?$", question):
      p, d = m.groups()
      found = {q for (x, dd, q) in rel if x == p and dd == d}
    else:
      d, p = re.match(r"^What is (\w+) of the (\w+)\?$", question).groups()
      found = {x for (x, dd, q) in rel if q == p and dd == d}
    assert len(found) == 1, (facts, question, found)
    return found.pop()

  where_actor, holder, lying_at, gives = {}, {}, {}, []
  history = {}

  def where_obj(o):
    if o in holder:
      return where_actor.get(holder[o])
    return lying_at.get(o)

  for f in facts:
    if m := _MOVE.match(f):
      where_actor[m[1]] = m[2]
    elif m := _GET.match(f):
      holder[m[2]] = m[1]
      lying_at.pop(m[2], None)
    elif m := _DROP.match(f):
      holder.pop(m[2], None)
      lying_at[m[2]] = where_actor.get(m[1])
    elif m := _GIVE.match(f):
      holder[m[2]] = m[3]
      gives.append(m.groups())
    else:
      raise AssertionError(f"unparsable fact {f!r}")
    for o in bl.OBJECTS:
      loc = where_obj(o)
      if loc is not None and history.setdefault(o, [])[-1:] != [loc]:
        history[o].append(loc)

  if m := re.match(r"^Where is (\w+)\?$", question):
    return where_actor[m[1]]
  if m := re.match(r"^Where is the (\w+)\?$", question):
    loc = where_obj(m[1])
    assert loc is not None
    return loc
  if m := re.match(r"^Where was the (\w+) before the (\w+)\?$", question):
    h = history[m[1]]
    assert h.count(m[2]) == 1 and h.index(m[2]) >= 1, (h, question)
    return h[h.index(m[2]) - 1]
  patterns = [
      (r"^What did (\w+) give to (\w+)\?$", lambda g, a, b: g[0] == a and g[2] == b, 1),
      (r"^Who gave the (\w+) to (\w+)\?$", lambda g, o, b: g[1] == o and g[2] == b, 0),
      (r"^Who gave the (\w+)\?$", lambda g, o: g[1] == o, 0),
      (r"^Who did (\w+) give the (\w+) to\?$", lambda g, a, o: g[0] == a and g[1] == o, 2),
      (r"^Who received the (\w+)\?$", lambda g, o: g[1] == o, 2),
  ]
  for pattern, match, field in patterns:
    if m := re.match(pattern, question):
      hits = [g for g in gives if match(g, *m.groups())]
      return hits[-1][field]
  raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("task", bl.TASKS)
def test_solver_agrees_and_supporting_facts_suffice(task):
  for index in range(60):
    ex = bl.make_example(task, 0, index, seed=11)
    facts, q, ans = ex["facts"], ex["question"], ex["answer"]
    assert ans in bl.LABELS[task]
    assert solve(task, facts, q) == ans, (facts, q, ans)
    support = [facts[i] for i in ex["supporting"]]
    assert solve(task, support, q) == ans, (support, q, ans)
    assert ex["context"] == " ".join(facts)


def test_fact_counts_per_task():
  counts = {t: [len(bl.make_example(t, 0, i)["facts"]) for i in range(80)] for t in bl.TASKS}
  assert set(counts["qa1"]) <= {2, 4, 6, 8, 10} and len(set(counts["qa1"])) >= 4
  assert set(counts["qa4"]) == {2}
  assert min(counts["qa3"]) >= 3 and max(counts["qa2"]) > 10 and max(counts["qa5"]) > 20


@pytest.mark.parametrize("task", bl.TASKS)
@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_length_order_and_noise(task, length):
  for index in range(3):
    ex = bl.make_example(task, length, index, seed=2)
    ctx = ex["context"]
    assert len(TOK.encode(ctx)) == ex["num_tokens"] == length      # byte tokenizer: exact
    pos, noise = 0, ctx
    for f in ex["facts"]:                                          # facts appear in story order
      found = ctx.find(f, pos)
      assert found >= 0, f
      pos = found + len(f)
      noise = noise.replace(f, " ", 1)
    assert solve(task, ex["facts"], ex["question"]) == ex["answer"]
    names = set(bl.LOCATIONS + bl.OBJECTS + bl.ACTORS + bl.ACTORS_QA5 + bl.DIRECTIONS)
    assert not any(n.lower() in noise.lower() for n in names)
    room = length - len(" ".join(ex["facts"]))
    assert len(noise.replace(" ", "")) >= 0.7 * (room - 2)         # the rest is filler
    if room > 200:
      assert len(noise.split(".")) >= 3


def test_filler_words_avoid_entity_names():
  names = [n.lower() for n in bl.LOCATIONS + bl.OBJECTS + bl.ACTORS + bl.ACTORS_QA5 + bl.DIRECTIONS]
  bad = [(w, n) for w in bl.FILLER_WORDS for n in names if n in w.lower()]
  assert not bad
  rng = np.random.default_rng(0)
  sentences = [bl.filler_sentence(rng) for _ in range(300)]
  assert len(set(sentences)) > 290 and all(s[0].isupper() and s.endswith(".") for s in sentences)


def test_determinism_and_index_dependence():
  a = bl.make_example("qa2", 1024, 5, seed=1)
  assert a == bl.make_example("qa2", 1024, 5, seed=1)
  assert a["context"] != bl.make_example("qa2", 1024, 6, seed=1)["context"]
  assert a["context"] != bl.make_example("qa2", 1024, 5, seed=2)["context"]
  assert a["context"] != bl.make_example("qa2", 1024, 5, seed=1, split=1)["context"]
  stories = {tuple(bl.make_example("qa1", 0, i)["facts"]) for i in range(30)}
  assert len(stories) == 30
  # The story does not depend on the length when its facts fit.
  assert bl.make_example("qa3", 4096, 4)["facts"] == bl.make_example("qa3", 0, 4)["facts"]


def test_errors():
  with pytest.raises(ValueError, match="unknown BABILong task"):
    bl.make_example("qa6", 0, 0)
  with pytest.raises(ValueError, match="fit"):
    bl.make_example("qa1", 20, 0)


def test_babilong_source_rows():
  src = bl.BabilongSource(("qa1", "qa5"), 256, batch_size=4, seed=3)
  assert src.vocab_size == 259 and src.seq_len == bl.default_seq_len(("qa1", "qa5"), 256)
  b = src.batch(2)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      k: ((4, src.seq_len), np.int32) for k in ("inputs", "targets", "segment_ids")}
  for r in range(4):
    i = 2 * 4 + r
    ex = src.example(i)
    assert ex["task"] == ("qa1", "qa5")[i % 2]
    x, y, s = b["inputs"][r], b["targets"][r], b["segment_ids"][r]
    mask = y != -100
    assert TOK.decode(y[mask]) == ex["answer"]
    start = int(np.argmax(mask))
    assert mask[start:start + len(ex["answer"])].all() and mask.sum() == len(ex["answer"])
    prompt = ex["context"] + "\nQuestion: " + ex["question"] + "\nAnswer: "
    assert TOK.decode(x[:start + 1]) == prompt                   # nothing truncated
    n = len(prompt) + len(ex["answer"])
    np.testing.assert_array_equal(s, np.arange(src.seq_len) < min(n, src.seq_len))
  again = bl.BabilongSource(("qa1", "qa5"), 256, batch_size=4, seed=3)
  np.testing.assert_array_equal(again.batch(2)["inputs"], b["inputs"])
  # The default seq_len is tight: the longest question/answer of qa3 fills it exactly.
  longest = max(len("\nQuestion: " + q + "\nAnswer: ") for q in bl.all_questions("qa3"))
  assert bl.default_seq_len(("qa3",), 100) == 100 + longest + len("bathroom") - 1
  with pytest.raises(ValueError, match="seq_len"):
    bl.BabilongSource("qa1", 0, batch_size=1)
  assert bl.BabilongSource("qa1", 0, batch_size=2, seq_len=300).batch(0)["inputs"].shape == (2, 300)


def test_sentencepiece_length_within_tolerance(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  from memarch.data.tokenizer import SentencePieceTokenizer  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  lines = [bl.make_example(t, 0, i)["context"] for t in bl.TASKS for i in range(6)]
  lines += [bl.filler_sentence(rng) for _ in range(200)]
  (tmp_path / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "m"),
                                 vocab_size=400, model_type="bpe", character_coverage=1.0,
                                 byte_fallback=True, minloglevel=2)
  tok = SentencePieceTokenizer(str(tmp_path / "m.model"))
  for task, length in (("qa2", 300), ("qa4", 1000)):
    ex = bl.make_example(task, length, 1, tokenizer=tok)
    assert abs(len(tok.encode(ex["context"])) - length) <= bl.length_tolerance(length, tok)
    assert all(f in ex["context"] for f in ex["facts"])
