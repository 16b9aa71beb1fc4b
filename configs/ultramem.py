"""UltraMemV2 (Huang et al. 2025, arXiv:2508.18756): a memory layer beside the FFN of every block.

  python scripts/train.py --config=configs/ultramem.py --workdir=runs/ultramem
  python scripts/train.py --config=configs/ultramem.py:n=64,k=32,share=0.17 --workdir=runs/um64

Every block's channel mixer is `layers.ultramem.UltraMem`: SwiGLU FFN + TDQKR memory (one head, rank
2, 2x2 Tucker cores, PEER-style pre-values and values, one shared output projection). Default data:
MAD memorization (memarch.data.memorization; vocab 256, 32 tokens, one fixed key->value map never
shown in context), where a parametric memory should beat a dense FFN of equal active FLOPs; `data=mqar`
for in-context recall, where a channel mixer cannot help (docs/architectures/peer.md). The
matched-baseline experiment is `python -m memarch.evals.memorization`.

Variants:
  `variant=default|shared`: `shared` gives the FFN the width that puts the memory at `share` of the
      layer's FLOPs (`layers.ultramem.ffn_hidden_for_share`; the paper finds ~17% best), `default`
      keeps the SwiGLU's 8/3 d width.
  `n=N` keys per side (N = n^2 rows; 0 = the size's default: 32 at tiny, 128 above), `k=M` TopM rows
  per token (0 = 16 at tiny, 64 above), `share=F` (0.17), `size=tiny|small|...`,
  `data=memorization|mqar|text` (text: the embedded Shakespeare plays, configs_lib.text_task).
Parameters (size=tiny, memorization vocab 256, n=32, k=16): default 211,552; shared 349,792
"""
from memarch import configs_lib

_DEFAULTS = {"tiny": dict(n=32, k=16)}
_LARGER = dict(n=128, k=64)


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, size="tiny", variant="default", n=0, k=0, share=0.17,
                            data="memorization")
  c = configs_lib.base_config(a.size)
  d = _DEFAULTS.get(a.size, _LARGER)
  kw = dict(num_subkeys=a.n or d["n"], top_m=a.k or d["k"])
  if a.variant == "shared":
    from layers.ultramem import UltraMemConfig, ffn_hidden_for_share
    kw["ffn_hidden"] = ffn_hidden_for_share(UltraMemConfig(c.model.d_model, **kw), float(a.share))
  elif a.variant != "default":
    raise ValueError(f"ultramem: unknown variant {a.variant!r}; choose default or shared")
  c.model.channel_pattern = ("ultramem",)
  c.model.channel = {"ultramem": kw}
  if a.data == "memorization":
    c.data.name = "memorization"
    c.data.seq_len = 32
    c.data.eval_examples = 256
    c.train.num_steps = 2000
  elif a.data == "mqar":
    c.train.num_steps = 1500
  elif a.data != "text":
    raise ValueError(f"unknown data {a.data!r}; choose memorization, mqar or text")
  c.train.stop_at_accuracy = 0.99
  if a.data == "text":
    configs_lib.text_task(c, {})
  return configs_lib.finalize(c)
