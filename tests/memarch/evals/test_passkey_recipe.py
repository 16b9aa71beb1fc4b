"""The passkey recipe: configs/landmark.py and configs/hcam.py with task=passkey train on
512-token passkey rows and evaluate to 8k tokens without the memory forgetting the key."""
import os

import numpy as np
import pytest

from memarch import configs_lib
from memarch.data import make_source
from memarch.data.needle import PasskeySource

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")


@pytest.mark.parametrize("family", ["landmark", "hcam"])
def test_passkey_task_config(family):
  cfg = configs_lib.load_config(os.path.join(ROOT, "configs", f"{family}.py") + ":task=passkey,steps=7")
  assert (cfg.data.name, cfg.data.seq_len, cfg.train.num_steps) == ("passkey", 512, 7)
  assert tuple(cfg.evals.names) == ("passkey",) and max(cfg.evals.lengths) == 16384
  src = make_source(cfg.data, seed=0)
  mixer = dict(cfg.model.mixer[family])
  landmarks = family == "landmark"  # the paper's layout: a landmark token closes every block
  assert isinstance(src, PasskeySource) and src.vocab_size == 259 + landmarks
  assert src.landmark_block == (mixer["block_size"] if landmarks else 0)
  b = src.batch(0)
  assert b["inputs"].shape == (cfg.data.batch_size, 512)
  # Language-model loss on the whole row: every real token but the last (and landmarks) has a target.
  n = (b["targets"] != -100).sum(-1)
  real = b["segment_ids"].sum(-1)
  lmk = (b["inputs"] == 259).sum(-1) if landmarks else 0
  assert (n >= real - lmk - 1).all() and (n > 400).all(), n
  if family == "hcam":  # the chunk memory covers the longest eval prompt
    assert mixer["max_chunks"] * mixer["chunk_size"] >= max(cfg.evals.lengths)
  # The MQAR default is untouched.
  mq = configs_lib.load_config(os.path.join(ROOT, "configs", f"{family}.py"))
  assert mq.data.name == "mqar" and np.isclose(mq.train.stop_at_accuracy, 0.99)


@pytest.mark.parametrize("family", ["landmark", "hcam"])
def test_unknown_task_fails(family):
  with pytest.raises(ValueError, match="unknown task"):
    configs_lib.load_config(os.path.join(ROOT, "configs", f"{family}.py") + ":task=babi")
