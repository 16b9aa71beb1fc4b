"""Gated DeltaNet baseline (Yang et al., ICLR 2025) on MQAR.

  python scripts/train.py --config=configs/gated_deltanet.py --workdir=runs/gdn

Variants: `size=tiny|small|base|170m|340m|760m|1.3b`, `chunk=N` (chunk of the WY form),
`hybrid=True` (every other layer sliding-window attention), `task=mqar|passkey|text` (text: the
embedded Shakespeare plays; configs_lib.text_task), `recipe=paper` with a paper size (the papers'
text recipe, at 1.3b with Gated DeltaNet's own 4e-4; docs/recipes.md).
Parameters (size=tiny, MQAR vocab 256): 127,368.
"""
from memarch import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, size="tiny", chunk=64, hybrid=False, task="mqar", recipe="", accum=0)
  c = configs_lib.base_config(a.size)
  c.model.layer_pattern = ("gated_deltanet", "swa") if a.hybrid else ("gated_deltanet",)
  c.model.mixer = {"gated_deltanet": dict(conv_size=4, chunk_size=a.chunk,
                                          implementation=configs_lib.impl_field()),
                   "swa": dict(window=64)}
  c.train.num_steps = 2000
  c.train.stop_at_accuracy = 0.99
  configs_lib.apply_task(c, a, "gated_deltanet")
  return configs_lib.finalize(c)
