"""Landmark attention (Mohtashami & Jaggi 2023, arXiv 2305.16300) on MQAR: grouped-softmax attention
over the own block, the W most recent blocks and the top-k older blocks (layers/landmark.py).

  python scripts/train.py --config=configs/landmark.py
  python scripts/train.py --config=configs/landmark.py:block=8,k=1,size=tiny --workdir=runs/landmark

Variants: `size=tiny|small|base|170m|...`; `block=L` (block length, landmark included; CPU sizes
16, else 64), `k=N` (older blocks retrieved per query; 0 = all, the paper's training form),
`recent=W` (always-visible recent blocks), `share=token_head|token`,
`positions=exact|stingy|none` (RoPE at stream positions; `stingy`: every block older than the W
recent ones is scored as if it sat just before them, so retrieval sees the same query-key distances
at any length, docs/architectures/landmark.md), `seq_len=L,kv=K` (MQAR task),
`task=mqar|passkey|text`, `steps=N`. Every L-th stream position acts as the block's landmark; the
default MQAR stream has no landmark token, so there it is an ordinary token with its own loss
[ours]. For the paper's layout, insert landmark tokens with `layers.landmark.insert_landmarks`.
Parameters (size=tiny, MQAR vocab 256): 117,056.

Passkey (byte tokens, 512-token training rows with a landmark token closing every block,
loss on every token; evaluated to 16k through the block cache):
  python scripts/train.py --config=configs/landmark.py:task=passkey --workdir=runs/landmark_passkey
  python scripts/eval.py --workdir=runs/landmark_passkey        # passkey at evals.lengths
  python scripts/train.py --config=configs/landmark.py:task=passkey,positions=stingy \
      --workdir=runs/landmark_passkey_stingy                     # extrapolating positions
"""
from memarch import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, size="tiny", block=0, k=-1, recent=-1, share="token_head",
                            positions="exact", seq_len=0, kv=0, task="mqar", recipe="", accum=0, steps=0)
  c = configs_lib.base_config(a.size)
  cpu = a.size in ("tiny", "small")
  c.model.layer_pattern = ("landmark",)
  c.model.mixer = {"landmark": dict(
      block_size=a.block or (16 if cpu else 64),
      top_k=a.k if a.k >= 0 else (2 if cpu else 4),
      recent_blocks=a.recent if a.recent >= 0 else (1 if cpu else 3),
      share=a.share, positions=a.positions, implementation=configs_lib.impl_field())}
  if a.seq_len:
    c.data.seq_len = a.seq_len
  if a.kv:
    c.data.num_kv_pairs = a.kv
  c.train.num_steps = 1500
  c.train.stop_at_accuracy = 0.99
  configs_lib.apply_task(c, a, "landmark")
  if a.task == "passkey":
    # The paper's layout: a landmark token closes every block (training rows and, via the eval
    # runner, every prompt), so a block's gate key is a learned token's, not an ordinary byte's.
    c.data.landmark_block = c.model.mixer.landmark.block_size
  return configs_lib.finalize(c)
