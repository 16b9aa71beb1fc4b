"""Helpers the tests share (not used by the library)."""
from __future__ import annotations

import importlib.util
import os

from memarch import configs_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def load_script(name: str):
  """scripts/<name>.py imported as a module (the scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(*, num_steps: int = 8, eval_every: int = 4, **train):
  """The Transformer++ on MQAR at a size that trains in seconds (d_model 32, one layer, batch 8 of
  32 tokens), logging every step and saving every 4; `train` overrides config.train fields."""
  c = configs_lib.load_config(os.path.join(ROOT, "configs/transformer.py"))
  c.unlock()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.data.batch_size, c.data.seq_len, c.data.eval_examples = 8, 32, 16
  c.train.update(dict(num_steps=num_steps, log_every=1, eval_every=eval_every, ckpt_every=4,
                      progress=False, stop_at_accuracy=0.0))
  c.train.update(train)
  c.opt.warmup_steps = 2
  c.lock()
  return c
