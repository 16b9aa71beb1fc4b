"""lm-evaluation-harness adapter and the published-BABILong reader, offline: local task YAMLs over
local JSON Lines files (tests/data/harness) run through lm_eval.simple_evaluate, a BABILong fixture
in the published layout (tests/data/babilong), and every reported score recomputed from
log-probabilities of one direct forward pass of the model (no streaming, no batching)."""
import json
import math
import os
import re

# Before `datasets` is imported (by lm_eval): any attempt to reach the Hub fails instead of
# downloading, so the tasks below must load from the local files.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from memarch import configs_lib  # noqa: E402
from memarch.evals import babilong_data, harness, report, runner  # noqa: E402
from memarch.evals.runner import EvalError  # noqa: E402
from memarch.train import train_and_evaluate  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TASK_DIR = os.path.join(ROOT, "tests", "data", "harness")
TASKS = ["memarch_mc", "memarch_cloze", "memarch_rolling", "memarch_generate"]
SEGMENT = 16  # every prompt is longer: contexts stream through the state over several calls


def _read(name):
  with open(os.path.join(TASK_DIR, name)) as f:
    return [json.loads(l) for l in f if l.strip()]


# One worker runs this module, so its module-scoped fixture is built once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("harness")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Gated DeltaNet (a recurrent state) trained for 3 steps on Shakespeare bytes."""
  c = configs_lib.load_config(os.path.join(ROOT, "configs/gated_deltanet.py:task=text,chunk=16"))
  c.unlock()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 16, 1, 2
  c.data.batch_size, c.data.seq_len, c.data.eval_rows = 4, 32, 4
  c.train.update(dict(num_steps=3, log_every=1, eval_every=0, ckpt_every=0, progress=False))
  c.opt.warmup_steps = 1
  c.mesh.num_devices = 1
  c.lock()
  wd = str(tmp_path_factory.mktemp("harness"))
  train_and_evaluate(c, wd, quiet=True)
  return wd


@pytest.fixture(scope="module")
def scorer(workdir):
  return harness.WorkdirScorer.from_workdir(workdir, segment_len=SEGMENT, batch_size=4)


class Direct:
  """Log-probabilities from one forward pass of the whole token sequence (padded after its end to
  WIDTH tokens, which causality keeps from changing them, so one program serves every length)."""

  WIDTH = 256

  def __init__(self, scorer):
    from flax import nnx
    gd, params = scorer.runner.graphdef, scorer.runner.params
    self.model = nnx.merge(gd, params)
    self.tok, self.eos = scorer.tok, scorer.tok.eos_id
    self._logp = jax.jit(lambda x: jax.nn.log_softmax(
        nnx.merge(gd, params)(x)[0][0].astype(jnp.float32), -1))

  def logp(self, ids):
    assert len(ids) <= self.WIDTH
    x = np.zeros((1, self.WIDTH), np.int32)
    x[0, :len(ids)] = ids
    return np.asarray(self._logp(jnp.asarray(x)), np.float64)[:len(ids)]

  def continuation(self, context: str, cont: str):
    """(sum of log p of cont's bytes after context, every byte the argmax)."""
    ctx, full = list(self.tok.encode(context)), list(self.tok.encode(context + cont))
    lp = self.logp(full[:-1])
    pos = range(len(ctx) - 1, len(full) - 1)
    return (sum(lp[p, full[p + 1]] for p in pos), all(lp[p].argmax() == full[p + 1] for p in pos))

  def document(self, text: str) -> float:
    ids = [self.eos] + list(self.tok.encode(text))
    lp = self.logp(ids[:-1])
    return float(sum(lp[p, ids[p + 1]] for p in range(len(ids) - 1)))

  def greedy(self, prompt: str, n: int) -> str:
    from memarch.sampling import generate
    out = generate(self.model, jnp.asarray([self.tok.encode(prompt)], jnp.int32), n)
    return self.tok.decode(np.asarray(out[0]))


def _samples(res, task):
  return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def test_simple_evaluate_scores_equal_direct_log_probs(scorer, monkeypatch):
  import datasets
  assert datasets.config.HF_HUB_OFFLINE  # the task files below load from disk, offline
  monkeypatch.chdir(ROOT)  # the YAMLs name their data files relative to the repository root
  res = harness.run_harness(scorer, TASKS, include_path=[TASK_DIR], bootstrap_iters=0,
                            log_samples=True, log=lambda m: None)
  direct = Direct(scorer)
  scores = res["results"]

  # Multiple choice: every choice's log-likelihood, acc and acc_norm (per character of the choice).
  docs = _read("mc.jsonl")
  acc, acc_norm = [], []
  for doc, sample in zip(docs, _samples(res, "memarch_mc")):
    ctx = f"Question: {doc['question']}\nAnswer:"
    ll = [direct.continuation(ctx, " " + c)[0] for c in doc["choices"]]
    np.testing.assert_allclose([r[0][0] for r in sample["resps"]], ll, atol=1e-3)
    acc.append(int(np.argmax(ll)) == doc["label"])
    acc_norm.append(int(np.argmax(np.array(ll) / [len(c) for c in doc["choices"]])) == doc["label"])
  assert len(docs) == 5
  assert scores["memarch_mc"]["acc,none"] == pytest.approx(np.mean(acc))
  assert scores["memarch_mc"]["acc_norm,none"] == pytest.approx(np.mean(acc_norm))

  # Continuation: perplexity = exp(-mean log-likelihood), acc = the greedy flag.
  docs = _read("cloze.jsonl")
  lls, greedy = zip(*[direct.continuation(d["context"], " " + d["target"]) for d in docs])
  got = [s["resps"][0][0] for s in _samples(res, "memarch_cloze")]
  np.testing.assert_allclose([g[0] for g in got], lls, atol=1e-3)
  assert [bool(g[1]) for g in got] == list(greedy)
  assert scores["memarch_cloze"]["perplexity,none"] == pytest.approx(math.exp(-np.mean(lls)),
                                                                     rel=1e-3)
  assert scores["memarch_cloze"]["acc,none"] == pytest.approx(np.mean(greedy))

  # Rolling: whole documents after the end-of-document token; word and byte normalisations.
  texts = [d["page"] for d in _read("rolling.jsonl")]
  lls = [direct.document(t) for t in texts]
  nbytes = sum(len(t.encode("utf-8")) for t in texts)
  words = sum(len(re.split(r"\s+", t)) for t in texts)
  r = scores["memarch_rolling"]
  assert r["bits_per_byte,none"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-4)
  assert r["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-4)
  assert r["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-3)
  assert 1.0 < r["bits_per_byte,none"] < 12.0

  # Generation: greedy decoding through the state equals the reference decoder, cut at "\n" or ".".
  for doc, sample in zip(_read("generate.jsonl"), _samples(res, "memarch_generate")):
    want = re.split(r"[\n.]", direct.greedy(doc["prompt"], 12))[0]
    assert sample["filtered_resps"][0] == want
  assert scores["memarch_generate"]["exact_match,none"] in (0.0, 0.5, 1.0)


def test_scorer_edge_cases_and_windows(scorer):
  direct = Direct(scorer)
  # Trailing whitespace of a context moves into the continuation; an empty context is EOS.
  assert scorer.encode_pair("to be ", "or") == (list(b"to be"), list(b" or"))
  assert scorer.encode_pair("", "ab") == ([scorer.tok.eos_id], list(b"ab"))
  (ll, _), (empty, hit) = scorer.loglikelihood([scorer.encode_pair("", "To be, or not"),
                                                ([1, 2], [])])
  assert (empty, hit) == (0.0, True)
  lp = direct.logp([scorer.tok.eos_id] + list(b"To be, or no"))
  assert ll == pytest.approx(sum(lp[i, t] for i, t in enumerate(b"To be, or not")), abs=1e-3)
  # max_length: disjoint windows of at most L targets, each scored from a fresh state.
  text = "Now is the winter of our discontent made glorious summer by this sun of York."
  ids = [scorer.tok.eos_id] + list(text.encode())
  windowed = harness.WorkdirScorer(scorer.runner, scorer.tok, batch_size=3, max_length=20)
  want = 0.0
  for s in range(0, len(ids) - 1, 20):
    chunk = ids[s:s + 21]
    lp = direct.logp(chunk[:-1])
    want += sum(lp[i, t] for i, t in enumerate(chunk[1:]))
  assert windowed.loglikelihood_rolling([text])[0] == pytest.approx(want, abs=2e-3)
  assert scorer.loglikelihood_rolling([text])[0] != pytest.approx(want, abs=1e-2)  # full context
  with pytest.raises(ValueError, match="greedily only"):
    harness.generation("x", {"do_sample": True})
  assert harness.pad_width(3, 16) == 8 and harness.pad_width(9, 16) == 16
  assert harness.pad_width(17, 16) == 32 and harness.pad_width(5, 4) == 8


def test_eval_runner_writes_harness_results(workdir, monkeypatch):
  monkeypatch.chdir(ROOT)
  quiet = dict(segment_len=SEGMENT, batch_size=4, log=lambda m: None)
  out = runner.run_evals(workdir, "harness", tasks=["memarch_mc"], include_path=[TASK_DIR],
                         limit=2, **quiet)["harness"]
  assert out["json"] == os.path.join(workdir, "eval", "harness.json")
  res = json.load(open(out["json"]))
  assert res["n-samples"]["memarch_mc"]["effective"] == 2 and res["step"] == 3
  (acc,) = [r for r in res["rows"] if r["metric"] == "acc"]
  assert acc["task"] == "memarch_mc" and acc["value"] in (0.0, 0.5, 1.0)
  assert "| memarch_mc | acc |" in open(out["md"]).read()
  (row,) = [r for r in report.load(workdir) if r["eval"] == "harness" and r["metric"] == "acc"]
  assert row["setting"] == "memarch_mc" and row["value"] == acc["value"] and row["step"] == 3
  with pytest.raises(EvalError, match="needs --tasks"):
    runner.run_evals(workdir, "harness", **quiet)
  with pytest.raises(EvalError, match="unknown harness task 'no_such_task'"):
    runner.run_evals(workdir, "harness", tasks=["no_such_task"], include_path=[TASK_DIR], **quiet)
  with pytest.raises(EvalError, match="separately"):
    runner.run_evals(workdir, "harness,babilong", tasks=["qa1"], **quiet)


# ---------------------------------------------------------------------------------------------------
# The published BABILong format (tests/data/babilong: lengths 0k and 1k, qa1 as a JSON list, qa6 as
# JSON Lines; the folder saved by `datasets` and Parquet files are built here).


def test_published_babilong_reader_layouts(tmp_path):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  src = os.path.join(ROOT, "tests", "data", "babilong")
  assert babilong_data.lengths_in(src) == ["0k", "1k"]
  qa1 = babilong_data.read(src, "qa1", "1k")
  assert len(qa1) == 3 and set(qa1[0]) == {"input", "question", "target"}
  assert qa1[0]["question"] == "Where is Mary?" and qa1[0]["target"] == "garden"
  datasets.DatasetDict({"qa1": datasets.Dataset.from_list(qa1)}).save_to_disk(str(tmp_path / "2k"))
  (tmp_path / "16k").mkdir()
  pq.write_table(pa.Table.from_pylist(qa1), str(tmp_path / "16k" / "qa1-00000-of-00001.parquet"))
  assert babilong_data.lengths_in(str(tmp_path)) == ["2k", "16k"]
  assert babilong_data.read(str(tmp_path), "qa1", "2k") == qa1
  assert babilong_data.read(str(tmp_path), "qa1", "16k") == qa1
  with pytest.raises(FileNotFoundError, match="has no split qa2"):
    babilong_data.read(str(tmp_path), "qa2", "2k")
  (tmp_path / "bad" / "0k").mkdir(parents=True)
  (tmp_path / "bad" / "0k" / "qa1.json").write_text(json.dumps([{"input": "x", "answer": "y"}]))
  with pytest.raises(ValueError, match="lack the field"):
    babilong_data.read(str(tmp_path / "bad"), "qa1", "0k")
  with pytest.raises(FileNotFoundError, match="not a folder"):
    babilong_data.lengths_in(str(tmp_path / "nowhere"))


def test_published_babilong_eval_equals_direct_restricted_argmax(workdir, scorer):
  from memarch.data.babilong import ANSWER_PREFIX, QUESTION_PREFIX
  src = os.path.join(ROOT, "tests", "data", "babilong")
  out = runner.run_evals(workdir, "babilong", babilong_path=src, num_examples=3, segment_len=SEGMENT,
                         batch_size=2, log=lambda m: None)["babilong"]
  res = json.load(open(out["json"]))
  assert res["tasks"] == ["qa1", "qa6"] and res["lengths"] == ["0k", "1k"]
  assert os.path.getsize(out["png"]) > 1000
  direct = Direct(scorer)
  for task in res["tasks"]:
    exs = {l: babilong_data.read(src, task, l) for l in res["lengths"]}
    labels = sorted({e["target"] for l in exs for e in exs[l]})
    assert len(labels) == (4 if task == "qa1" else 2)
    for length, examples in exs.items():
      hits = []
      for e in examples:
        prompt = e["input"] + QUESTION_PREFIX + e["question"] + ANSWER_PREFIX
        ll = [direct.continuation(prompt, a)[0] for a in labels]
        hits.append(labels[int(np.argmax(ll))] == e["target"])
      assert res["accuracy"][task][length] == pytest.approx(np.mean(hits)), (task, length)
  rows = {(r["setting"], r["metric"]): r for r in report.load(workdir) if r["eval"] == "babilong"}
  assert rows[("mean @ 1k", "accuracy")]["value"] == pytest.approx(res["mean"]["1k"])
  assert rows[("qa6 @ 0k", "accuracy")]["length"] == 0
  with pytest.raises(EvalError, match="matches no length folder"):
    runner.run_evals(workdir, "babilong", babilong_path=src, lengths=[2000], log=lambda m: None)
