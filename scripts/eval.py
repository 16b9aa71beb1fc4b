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
".[eval]").
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir with checkpoints", required=True)
_EVALS = flags.DEFINE_string("evals", None, "comma-separated: babilong,passkey,niah,mqar,perplexity,"
                             "harness "
                             "(default: the config's evals.names)")
_LENGTHS = flags.DEFINE_list("lengths", None, "context/prompt lengths in tokens, e.g. 1024,2048")
_DEPTHS = flags.DEFINE_list("depths", None, "needle/passkey depths in [0, 1], e.g. 0,0.5,1")
_TASKS = flags.DEFINE_list("tasks", None, "BABILong tasks, e.g. qa1,qa2; with --evals=harness "
                           "lm-eval task names, e.g. piqa,hellaswag")
_NUM = flags.DEFINE_integer("num_examples", None, "examples per cell")
_SEGMENT = flags.DEFINE_integer("segment_len", None, "tokens per model call (state carried)")
_BATCH = flags.DEFINE_integer("batch_size", None, "examples per batch")
_MQAR = flags.DEFINE_string("mqar_settings", None, "MQAR seq_len:kv list, e.g. 64:4,128:8")
_SEED = flags.DEFINE_integer("seed", 0, "eval example seed")
_TEXT_PATHS = flags.DEFINE_list("text_paths", None, "perplexity: local text files to score (one "
                                "document each) instead of the held-out split")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "perplexity: tokens scored per length, spread "
                                   "over the documents (0 = all)")
_LIMIT = flags.DEFINE_float("limit", None, "harness: examples per task (a fraction of each task when "
                            "< 1)")
_INCLUDE = flags.DEFINE_list("include_path", None, "harness: folders of local task YAMLs")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "harness: few-shot examples (default: each "
                                "task's own)")
_BABILONG_PATH = flags.DEFINE_string("babilong_path", None, "babilong: a local copy of the published "
                                     "BABILong data (one folder per length: 0k, 1k, ...) to score "
                                     "instead of our generator")
_TRAIN_FIRST = flags.DEFINE_bool("train_first", False, "train --config in --workdir first")
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg] for --train_first",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from memarch.evals.runner import EvalError, parse_names, run_evals
  from memarch.train import TrainingError, train_and_evaluate
  try:
    parse_names(_EVALS.value)  # fail on a typo before any training
    if _TRAIN_FIRST.value:
      if _CONFIG.value is None:
        raise EvalError("--train_first needs --config=configs/<family>.py[:args]")
      train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    run_evals(_WORKDIR.value, _EVALS.value,
              lengths=[int(x) for x in _LENGTHS.value] if _LENGTHS.value else None,
              depths=[float(x) for x in _DEPTHS.value] if _DEPTHS.value else None,
              tasks=_TASKS.value, num_examples=_NUM.value, segment_len=_SEGMENT.value,
              batch_size=_BATCH.value, mqar_settings=_MQAR.value, seed=_SEED.value,
              text_paths=_TEXT_PATHS.value, max_tokens=_MAX_TOKENS.value,
              limit=_LIMIT.value, include_path=_INCLUDE.value, num_fewshot=_FEWSHOT.value,
              babilong_path=_BABILONG_PATH.value)
  except (EvalError, TrainingError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
