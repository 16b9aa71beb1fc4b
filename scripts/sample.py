"""Decode from a trained workdir through the recurrent state (greedy or with temperature).

  python scripts/sample.py --workdir=runs/titans                      # MQAR: recall by streaming
  python scripts/sample.py --workdir=runs/text --prompt="Once upon" --num_new=64 --temperature=0.8
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir with checkpoints", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "text prompt (byte/SentencePiece models)")
_NUM_NEW = flags.DEFINE_integer("num_new", 32, "tokens to generate")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_EXAMPLES = flags.DEFINE_integer("examples", 4, "MQAR: test examples to decode")


def main(argv):
  del argv
  import numpy as np
  from memarch.sampling import generate, load_trained
  cfg, data, model = load_trained(_WORKDIR.value)
  if cfg.data.name == "mqar" and _PROMPT.value is None:
    ev = data.eval_set(_EXAMPLES.value)
    hits = total = 0
    for x, y in zip(ev["inputs"], ev["targets"]):
      # Prefill up to each query through the state, then decode one token.
      q = np.nonzero(y != -100)[0]
      for pos in q:
        pred = int(generate(model, x[None, :pos + 1], 1, temperature=_TEMP.value)[0, 0])
        hits += pred == y[pos]
        total += 1
        print(f"query key {x[pos]:4d} -> predicted {pred:4d}  (target {y[pos]:4d})")
    print(f"streaming recall: {hits}/{total} = {hits / max(total, 1):.3f}")
    return
  from memarch.data.tokenizer import get_tokenizer
  # The training source's tokenizer (a BPE trained into the workdir included).
  tok = getattr(data, "tokenizer", None) or get_tokenizer(cfg.data.tokenizer,
                                                          cfg.data.spm_model or None)
  prompt = np.asarray(tok.encode(_PROMPT.value or ""))[None]
  out = generate(model, prompt, _NUM_NEW.value, temperature=_TEMP.value)
  print(_PROMPT.value + tok.decode(np.asarray(out[0])))


if __name__ == "__main__":
  app.run(main)
