"""Train any memarch model: python scripts/train.py --config=configs/titans.py [--workdir=DIR]

Overrides: --config.model.d_model=128 --config.train.num_steps=500. Rerunning the same command resumes
from the newest checkpoint in the workdir.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: runs/<config name>)")


def main(argv):
  del argv
  from memarch.train import TrainingError, train_and_evaluate
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/titans.py")
  workdir = _WORKDIR.value
  if workdir is None:
    spec = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else "run"
    name = os.path.splitext(os.path.basename(str(spec).split(":")[0]))[0]
    workdir = os.path.join("runs", name)
  try:
    train_and_evaluate(cfg, workdir)
  except (TrainingError, ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
