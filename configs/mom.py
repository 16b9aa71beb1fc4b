"""Mixture-of-Memories (Du et al. 2025) with the gated-delta backend, on MQAR.

  python scripts/train.py --config=configs/mom.py --workdir=runs/mom

Variants: `size=...`, `memories=M`, `topk=k`, `shared=True|False`, `balance=0.01` (aux loss weight),
`task=mqar|passkey|text` (configs_lib).
Parameters (size=tiny, MQAR vocab 256): 195,464.
"""
from memarch import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, size="tiny", memories=4, topk=2, shared=True, balance=0.01,
                            chunk=64, task="mqar", recipe="", accum=0)
  c = configs_lib.base_config(a.size)
  c.model.layer_pattern = ("mom",)
  c.model.mixer = {"mom": dict(num_memories=a.memories, top_k=a.topk, shared_memory=a.shared,
                               conv_size=4, chunk_size=a.chunk,
                               implementation=configs_lib.impl_field())}
  c.train.aux_loss_weights = {"balance": a.balance}
  c.train.num_steps = 2000
  c.train.stop_at_accuracy = 0.99
  c.train.stats_every = 100
  configs_lib.apply_task(c, a, "mom")
  return configs_lib.finalize(c)
