"""Evaluate a trained memarch workdir: BABILong-style, passkey, S-NIAH-1, MQAR and held-out
perplexity (bits per byte) against context length.

  python scripts/eval.py --workdir=runs/babilong_gdn                        # the config's evals.names
  python scripts/eval.py --workdir=runs/babilong_gdn --evals=babilong,passkey --lengths=1024,4096
  python scripts/eval.py --workdir=runs/transformer --evals=mqar --mqar_settings=64:4,128:8
  python scripts/eval.py --workdir=runs/tf_text --evals=perplexity --lengths=512,2048,8192
  python scripts/eval.py --workdir=runs/tf_text --evals=perplexity --text_paths=a.txt,b.txt
  python scripts/eval.py --workdir=runs/tf_text --evals=harness --tasks=piqa,hellaswag --limit=100
  python scripts/eval.py --workdir=runs/tf_text --evals=harness --tasks=my_task --include_path=tasks/
  python scripts/eval.py --workdir=runs/babilong_gdn --evals=babilong --babilong_path=data/babilong
  python scripts/eval.py --workdir=/tmp/w --train_first --config=configs/babilong.py \\
      --config.train.num_steps=50                                           # train a tiny model first

Writes <workdir>/eval/<name>.json and <name>.png (MQAR also mqar.md; perplexity.json is a list that
later runs merge into; harness: harness.json and harness.md). See memarch/evals/runner.py,
memarch/evals/perplexity.py and memarch/evals/harness.py (lm-evaluation-harness, pip install -e
".[eval]"). Errors print one line (`error: ...`, exit status 2); --verbose adds the traceback.
"""

from absl import flags
from ml_collections import config_flags

from memarch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir with checkpoints", required=True)
_EVALS = flags.DEFINE_string("evals", None, "comma-separated: babilong,passkey,niah,mqar,perplexity,"
                             "harness "
                             "(default: the config's evals.names)")
_LENGTHS = flags.DEFINE_list("lengths", None, "context/prompt lengths in tokens, e.g. 1024,2048")
_DEPTHS = flags.DEFINE_list("depths", None, "needle/passkey depths in [0, 1], e.g. 0,0.5,1")
_TASKS = flags.DEFINE_list("tasks", None, "BABILong tasks, e.g. qa1,qa2; with --evals=harness "
                           "lm-eval task names, e.g. piqa,hellaswag")
_NUM = flags.DEFINE_integer("num_examples", None, "examples per cell", lower_bound=1)
_SEGMENT = flags.DEFINE_integer("segment_len", None, "tokens per model call (state carried)",
                                lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", None, "examples per batch", lower_bound=1)
_MQAR = flags.DEFINE_string("mqar_settings", None, "MQAR seq_len:kv list, e.g. 64:4,128:8")
_SEED = flags.DEFINE_integer("seed", 0, "eval example seed")
_TEXT_PATHS = flags.DEFINE_list("text_paths", None, "perplexity: local text files to score (one "
                                "document each) instead of the held-out split")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "perplexity: tokens scored per length, spread "
                                   "over the documents (0 = all)", lower_bound=0)
_LIMIT = flags.DEFINE_float("limit", None, "harness: examples per task (a fraction of each task when "
                            "< 1)", lower_bound=0)
_INCLUDE = flags.DEFINE_list("include_path", None, "harness: folders of local task YAMLs")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "harness: few-shot examples (default: each "
                                "task's own)", lower_bound=0)
_BABILONG_PATH = flags.DEFINE_string("babilong_path", None, "babilong: a local copy of the published "
                                     "BABILong data (one folder per length: 0k, 1k, ...) to score "
                                     "instead of our generator")
_TRAIN_FIRST = flags.DEFINE_bool("train_first", False, "train --config in --workdir first")
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg] for --train_first",
                                          lock_config=True)


def _numbers(flag: str, values, kind):
  """--lengths=1024,2048 -> [1024, 2048], with a one-line error naming the flag."""
  out = []
  for v in values or ():
    try:
      out.append(kind(v))
    except ValueError:
      raise cli.CliError(f"--{flag}: {v!r} is not {'an integer' if kind is int else 'a number'}"
                         ) from None
  return out or None


def main(argv):
  cli.no_extra_args(argv)
  workdir = cli.workdir_arg(_WORKDIR.value, writable=_TRAIN_FIRST.value)
  lengths = _numbers("lengths", _LENGTHS.value, int)
  depths = _numbers("depths", _DEPTHS.value, float)
  from memarch.evals.runner import EvalError, parse_names, run_evals
  parse_names(_EVALS.value)  # fail on a typo before any training
  if _TRAIN_FIRST.value:
    if _CONFIG.value is None:
      raise EvalError("--train_first needs --config=configs/<family>.py[:args]")
    from memarch.train import train_and_evaluate
    train_and_evaluate(_CONFIG.value, workdir)
  elif _CONFIG.value is not None:
    raise EvalError("--config is read only with --train_first (the workdir's config.json describes "
                    "its model)")
  run_evals(workdir, _EVALS.value, lengths=lengths, depths=depths, tasks=_TASKS.value,
            num_examples=_NUM.value, segment_len=_SEGMENT.value, batch_size=_BATCH.value,
            mqar_settings=_MQAR.value, seed=_SEED.value, text_paths=_TEXT_PATHS.value,
            max_tokens=_MAX_TOKENS.value, limit=_LIMIT.value, include_path=_INCLUDE.value,
            num_fewshot=_FEWSHOT.value, babilong_path=_BABILONG_PATH.value)


if __name__ == "__main__":
  cli.run(main)
