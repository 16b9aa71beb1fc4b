"""Transformer++ baseline: RoPE softmax attention + SwiGLU, pre-RMSNorm
(docs/architectures/transformer.md).

  python scripts/train.py --config=configs/transformer.py:size=tiny --workdir=/tmp/transformer

Variants: `size=tiny|small|base|170m|340m|760m|1.3b`; `window=N` makes every layer sliding-window
attention; `task=mqar|passkey|text` (text: the embedded Shakespeare plays, byte tokens, held-out
plays scored during training; configs_lib.text_task); `recipe=paper` with a paper size (the papers'
text recipe, 4096-token rows, 0.5M tokens per step; `accum=N` micro-batches; docs/recipes.md):

  python scripts/train.py --config=configs/transformer.py:task=text --workdir=runs/tf_text
  python scripts/eval.py --workdir=runs/tf_text --evals=perplexity --lengths=512,2048,8192
  python scripts/train.py --config=configs/transformer.py:size=340m,recipe=paper --dry_run

Parameters (size=tiny, MQAR vocab 256): 117,056.
"""
from memarch import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, size="tiny", window=0, task="mqar", recipe="", accum=0)
  c = configs_lib.base_config(a.size)
  if a.window:
    c.model.layer_pattern = ("swa",)
    c.model.mixer = {"swa": {"window": a.window}}
  c.train.num_steps = 1500
  c.train.stop_at_accuracy = 0.99
  configs_lib.apply_task(c, a, "transformer")
  return configs_lib.finalize(c)
