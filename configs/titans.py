"""Titans (Behrouz et al. 2025): MAC (default), MAG, MAL, or the LMM alone, on MQAR.

  python scripts/train.py --config=configs/titans.py
  python scripts/train.py --config=configs/titans.py:variant=mag,size=tiny --workdir=runs/mag

Variants: `variant=mac|mag|mal|lmm`, `size=tiny|small|base|170m|340m|760m|1.3b`, `depth=N`
(memory MLP depth, 1 = linear memory), `chunk=N` (inner mini-batch size b), `seq_len=L,kv=K` (MQAR
task), `task=mqar|passkey|text` (configs_lib; text needs packed-document support in the mixer),
`recipe=paper` with a paper size (Titans' text recipe, docs/recipes.md; `accum=N` micro-batches).
Parameters (size=tiny, MQAR vocab 256): mac 196,048; mag 187,728; mal 195,920; lmm 163,024.
"""
from memarch import configs_lib

MIXER = {"mac": "titans_mac", "mag": "titans_mag", "mal": "titans_mal", "lmm": "titans_lmm"}


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, variant="mac", size="tiny", depth=2, chunk=16, seq_len=0, kv=0,
                            task="mqar", recipe="", accum=0)
  if a.variant not in MIXER:
    raise ValueError(f"titans: unknown variant {a.variant!r}; choose mac, mag, mal or lmm")
  c = configs_lib.base_config(a.size)
  name = MIXER[a.variant]
  cpu = a.size in ("tiny", "small")
  c.model.layer_pattern = (name,)
  c.model.mixer = {name: dict(
      memory_depth=a.depth, expansion=4, chunk_size=a.chunk, theta_max=0.0,  # 0: per-depth default
      num_persistent=a.chunk if cpu else 128, conv_size=4, momentum=True,
      segment_len=32 if cpu else 512, window=64 if cpu else 2048,
      implementation=configs_lib.impl_field())}
  if a.seq_len:
    c.data.seq_len = a.seq_len
  if a.kv:
    c.data.num_kv_pairs = a.kv
  # MQAR runs stop once eval accuracy reaches 0.99 (MAC tiny: ~650 steps, ~4 minutes on an idle
  # 2-core CPU); evaluating every 50 steps stops them close to that point.
  c.train.num_steps = 1200
  c.train.eval_every = 50
  c.train.stop_at_accuracy = 0.99
  c.train.stats_every = 100
  configs_lib.apply_task(c, a, "titans")
  return configs_lib.finalize(c)
