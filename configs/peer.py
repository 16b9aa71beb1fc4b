"""PEER (He 2024, "Mixture of A Million Experts", arXiv:2407.04153) replacing the FFN of chosen blocks.

  python scripts/train.py --config=configs/peer.py --workdir=runs/peer
  python scripts/train.py --config=configs/peer.py:layers=all,n=64,k=16,heads=8 --workdir=runs/peer_all

Default data: MAD memorization (memarch.data.memorization; vocab 256, 32 tokens, one fixed key->value
map never shown in context), because a parametric expert memory is where PEER should beat a dense FFN
of equal active FLOPs; `data=mqar` trains on in-context recall instead, where a channel mixer cannot
help (docs/architectures/peer.md). The memorization experiment against parameter- and
FLOP-matched dense FFNs is `python -m memarch.evals.memorization`.

Variants:
  `variant=middle|all`: PEER in the middle block only (block num_layers // 2, the paper's placement),
      or in every block; `layers=1+3` ('+'-separated block indices) overrides it. Other blocks keep
      the SwiGLU FFN.
  `n=N` sub-keys per side (N = n^2 experts; 0 = the size's default: 32 at tiny, 128 above),
  `k=K` experts per head (0 = 8 at tiny, 16 above), `heads=H` retrieval heads (0 = 4 at tiny, 8 above),
  `size=tiny|small|...`, `data=memorization|mqar|text` (text: the embedded Shakespeare plays,
  configs_lib.text_task).
Parameters (size=tiny, memorization vocab 256, n=32, h=4, k=8): middle 223,552; all 330,048
"""
from memarch import configs_lib

_DEFAULTS = {"tiny": dict(n=32, k=8, heads=4)}
_LARGER = dict(n=128, k=16, heads=8)


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, size="tiny", variant="middle", layers="", n=0, k=0, heads=0,
                            data="memorization")
  c = configs_lib.base_config(a.size)
  d = _DEFAULTS.get(a.size, _LARGER)
  n, k, heads = a.n or d["n"], a.k or d["k"], a.heads or d["heads"]
  num_layers = c.model.num_layers
  if a.layers:
    layers = {int(i) for i in str(a.layers).split("+") if str(i).strip()}
  elif a.variant == "middle":
    layers = {num_layers // 2}
  elif a.variant == "all":
    layers = set(range(num_layers))
  else:
    raise ValueError(f"peer: unknown variant {a.variant!r}; choose middle or all (or layers=1+3)")
  if not layers or not all(0 <= i < num_layers for i in layers):
    raise ValueError(f"peer: layers={a.layers!r} must name blocks in [0, {num_layers})")
  c.model.channel_pattern = tuple("peer" if i in layers else "swiglu" for i in range(num_layers))
  c.model.channel = {"swiglu": {}, "peer": dict(num_subkeys=n, top_k=k, num_heads=heads)}
  _set_data(c, a.data)
  return configs_lib.finalize(c)


def _set_data(c, data):
  if data == "memorization":
    # MAD's memorization setting (Poli et al. 2024, arXiv 2403.17844): vocab 256 at the CPU sizes
    # (the preset's), 32 tokens = 16 "key, insert" pairs per sequence.
    c.data.name = "memorization"
    c.data.seq_len = 32
    c.data.eval_examples = 256
    c.train.num_steps = 2000
  elif data == "mqar":
    c.train.num_steps = 1500
  elif data == "text":
    configs_lib.text_task(c, {})
    return
  else:
    raise ValueError(f"unknown data {data!r}; choose memorization, mqar or text")
  c.train.stop_at_accuracy = 0.99
