"""Train any memarch model: python scripts/train.py --config=configs/titans.py [--workdir=DIR]

Overrides: --config.model.d_model=128 --config.train.num_steps=500. Rerunning the same command resumes
from the newest checkpoint in the workdir. Errors print one line (`error: ...`, exit status 2);
--verbose adds the traceback and the libraries' INFO logs. --dry_run prints what the config will
cost (parameters, tokens per step, FLOPs per token, memory per device) and exits.
"""
import os

from absl import flags
from ml_collections import config_flags

from memarch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: runs/<config name>)")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "print the parameter count, tokens per step, FLOPs per token and a memory "
    "estimate per device, then exit without training (nothing is compiled or written)")


def main(argv):
  cli.no_extra_args(argv, f"did you mean --workdir={argv[-1]}?" if len(argv) == 2 else "")
  cfg = _CONFIG.value
  if cfg is None:
    raise cli.CliError("--config is required, e.g. --config=configs/titans.py")
  if _DRY_RUN.value:
    from memarch import dry_run
    print(dry_run.report(dry_run.plan(cfg), cfg), flush=True)
    return
  workdir = cli.workdir_arg(_WORKDIR.value, writable=True)
  if workdir is None:
    spec = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else "run"
    name = os.path.splitext(os.path.basename(str(spec).split(":")[0]))[0]
    workdir = cli.workdir_arg(os.path.join("runs", name), writable=True)
  from memarch.train import train_and_evaluate
  train_and_evaluate(cfg, workdir)


if __name__ == "__main__":
  cli.run(main, interrupted="interrupted; rerun the same command to resume from the newest checkpoint")
