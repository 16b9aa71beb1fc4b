"""Decode from a trained workdir through the recurrent state (greedy or with temperature).

  python scripts/sample.py --workdir=runs/titans                      # MQAR: recall by streaming
  python scripts/sample.py --workdir=runs/text --prompt="Once upon" --num_new=64 --temperature=0.8

Errors print one line (`error: ...`, exit status 2); --verbose adds the traceback.
"""
import sys

from absl import flags

from memarch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir with checkpoints", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "text prompt (models trained on text; required there)")
_NUM_NEW = flags.DEFINE_integer("num_new", 32, "tokens to generate", lower_bound=1)
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples from softmax(logits / T)",
                           lower_bound=0.0)
_EXAMPLES = flags.DEFINE_integer("examples", 4, "MQAR: test examples to decode", lower_bound=1)

# Sources whose rows are text in a tokenizer's ids (a prompt makes sense); data.name values.
TEXT_DATA = ("text", "shakespeare", "tfds", "babilong", "passkey", "niah")


def main(argv):
  cli.no_extra_args(argv, "pass the prompt as --prompt='...'")
  import math
  if not math.isfinite(_TEMP.value):
    raise cli.CliError(f"--temperature must be a finite number >= 0, got {_TEMP.value}")
  workdir = cli.workdir_arg(_WORKDIR.value)
  # Cheap checks on config.json first: no model is built for a workdir or prompt that cannot work.
  saved = cli.trained_workdir(workdir)
  trained_on = saved["data"].get("name")
  if trained_on == "mqar":
    if _PROMPT.value is not None:
      raise cli.CliError(f"{workdir} was trained on MQAR (token ids, no text): leave --prompt out to "
                         "decode its test queries")
  elif trained_on in TEXT_DATA:
    if not _PROMPT.value:
      raise cli.CliError(f"{workdir} was trained on text (data.name={trained_on}): pass a prompt to "
                         "continue, e.g. --prompt='ROMEO:'")
  else:
    raise cli.CliError(f"sample.py decodes models trained on text or MQAR; {workdir} was trained on "
                       f"data.name={trained_on} (use scripts/eval.py)")

  import numpy as np

  from memarch.sampling import generate, load_trained
  cfg, data, model = load_trained(workdir)
  if trained_on == "mqar":
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
  prompt = np.asarray(tok.encode(_PROMPT.value))[None]
  if prompt.shape[1] > cfg.data.seq_len:
    print(f"warning: the prompt is {prompt.shape[1]} tokens, longer than the {cfg.data.seq_len} the "
          "model was trained on (data.seq_len); continuing, but it has never seen positions past "
          f"{cfg.data.seq_len}", file=sys.stderr, flush=True)
  out = generate(model, prompt, _NUM_NEW.value, temperature=_TEMP.value)
  print(_PROMPT.value + tok.decode(np.asarray(out[0])))


if __name__ == "__main__":
  cli.run(main)
