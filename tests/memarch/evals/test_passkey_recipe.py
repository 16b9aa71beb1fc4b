"""The passkey recipe of issue #7: configs/landmark.py and configs/hcam.py with task=passkey train on
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
  assert tuple(cfg.evals.names) == ("passkey",) and max(cfg.evals.lengths) == 8192
  src = make_source(cfg.data, seed=0)
  assert isinstance(src, PasskeySource) and src.vocab_size == 259
  b = src.batch(0)
  assert b["inputs"].shape == (cfg.data.batch_size, 512)
  # Loss only on the key's digits (at most 5 per row).
  n = (b["targets"] != -100).sum(-1)
  assert ((n >= 1) & (n <= 5)).all(), n
  mixer = dict(cfg.model.mixer[family])
  if family == "hcam":  # the chunk memory covers the longest eval prompt
    assert mixer["max_chunks"] * mixer["chunk_size"] >= max(cfg.evals.lengths)
  # The MQAR default is untouched.
  mq = configs_lib.load_config(os.path.join(ROOT, "configs", f"{family}.py"))
  assert mq.data.name == "mqar" and np.isclose(mq.train.stop_at_accuracy, 0.99)


@pytest.mark.parametrize("family", ["landmark", "hcam"])
def test_unknown_task_fails(family):
  with pytest.raises(ValueError, match="unknown task"):
    configs_lib.load_config(os.path.join(ROOT, "configs", f"{family}.py") + ":task=babi")
