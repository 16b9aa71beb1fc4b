"""Bad input to scripts/train.py, eval.py and sample.py, run as a user would (subprocesses): each gets
exactly one line, `error: ...`, on stderr and exit status 2, with no traceback (docs/reliability.md, "Script arguments").

The flag and config cases fail before jax is imported (well under a second each); the cases that need
a trained model share one tiny Shakespeare workdir trained in this process.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(ROOT, "configs")
# A tiny transformer, so that if a case were accepted it would finish quickly instead of training.
TINY = ["--config.model.d_model=16", "--config.model.num_layers=1", "--config.train.num_steps=1",
        "--config.data.batch_size=8", "--config.mesh.num_devices=1", "--config.train.progress=False"]


def run_script(script, *args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def assert_one_error(r, line):
  """Exit status 2, stderr is exactly `line`, and no traceback anywhere."""
  assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
  assert [l for l in r.stderr.splitlines() if l.strip()] == [line], r.stderr[-3000:]
  assert r.returncode == 2, r.returncode


def config_names():
  return ", ".join(n for n in sorted(os.listdir(CONFIGS)) if n.endswith(".py") and n != "__init__.py")


# One worker runs this module, so its module-scoped fixture is built once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("cli_errors")


@pytest.fixture(scope="module")
def text_workdir(tmp_path_factory):
  """A tiny byte-level Shakespeare model, trained 2 steps (data.seq_len 32), with checkpoints."""
  from memarch import configs_lib
  from memarch.train import train_and_evaluate
  c = configs_lib.load_config(os.path.join(CONFIGS, "transformer.py:task=text"))
  c.unlock()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 16, 1, 2
  c.data.batch_size, c.data.seq_len, c.data.eval_rows = 4, 32, 4
  c.train.update(dict(num_steps=2, eval_every=0, ckpt_every=1, progress=False))
  c.opt.warmup_steps = 1
  c.mesh.num_devices = 1
  c.lock()
  wd = str(tmp_path_factory.mktemp("text") / "w")
  train_and_evaluate(c, wd, quiet=True)
  assert os.listdir(os.path.join(wd, "checkpoints"))
  return wd


def mqar_workdir(root):
  """config.json of the MQAR transformer and a checkpoint folder: enough for the checks made before
  a model is loaded."""
  from memarch import configs_lib
  wd = os.path.join(root, "mqar")
  os.makedirs(os.path.join(wd, "checkpoints", "4"))
  with open(os.path.join(wd, "config.json"), "w") as f:
    f.write(configs_lib.to_json(configs_lib.load_config(os.path.join(CONFIGS, "transformer.py"))))
  return wd


# (script, args, expected stderr line); {wd}: the trained text workdir, {tmp}: an empty folder,
# {cfg}: the configs folder. None of these cases imports jax: each takes well under a second.
FAST_CASES = [
    # --workdir= would write checkpoints and metrics into the current folder.
    ("train.py", ["--config={cfg}/transformer.py", "--workdir=", *TINY],
     "error: --workdir is empty; pass a directory, e.g. --workdir=runs/my_run"),
    ("train.py", ["--config={cfg}/transformer.py", "--workdir={tmp}/a_file/w", *TINY],
     "error: --workdir={tmp}/a_file/w cannot be created: {tmp}/a_file is a file, not a directory"),
    ("train.py", ["--config={cfg}/transformer.py", "{tmp}/w", *TINY],
     "error: unexpected argument '{tmp}/w'; did you mean --workdir={tmp}/w?"),
    ("train.py", ["--workdir={tmp}/w"],
     "error: --config is required, e.g. --config=configs/titans.py"),
    ("train.py", ["--config={cfg}/titans.py:varaint=mac", "--workdir={tmp}/w"],
     "error: flag --config={cfg}/titans.py:varaint=mac: unknown config arg 'varaint'; valid: "
     "['accum', 'chunk', 'depth', 'kv', 'recipe', 'seq_len', 'size', 'task', 'variant']"),
    ("train.py", ["--config={cfg}/transformer.py", "--config.model.not_a_key=3", "--workdir={tmp}/w"],
     "error: --config.model.not_a_key: config.model has no field 'not_a_key'; its fields: channel, "
     "channel_pattern, d_model, dtype, layer_pattern, mixer, num_heads, num_layers, param_dtype, "
     "remat, scan_layers, tie_embeddings, vocab_size"),
    ("train.py", ["--config={cfg}/transformer.py", "--config.model.param_dtype=float16",
                  "--workdir={tmp}/w", *TINY],
     "error: model.param_dtype='float16' is not one of float32, bfloat16"),
    ("train.py", ["--config={cfg}/transformer.py", "--config.train.num_steps=many",
                  "--workdir={tmp}/w"],
     "error: flag --config.train.num_steps=many: invalid literal for int() with base 10: 'many'"),
    # ml_collections defers a missing config file to its first use, with a multi-line message.
    ("train.py", ["--config={cfg}/titanz.py", "--workdir={tmp}/w"],
     "error: config file '{cfg}/titanz.py' does not exist; {cfg}/ has {names}"),
    ("train.py", ["--config.train.num_steps=3", "--workdir={tmp}/w"],
     "error: --config.train.num_steps overrides a config, but no --config=<file> is given, e.g. "
     "--config=configs/titans.py"),
    # Negative temperatures sampled from the reversed distribution; --num_new=-5 was an MLIRError.
    ("sample.py", ["--workdir={wd}", "--prompt=ROMEO:", "--temperature=-1"],
     "error: flag --temperature=-1: -1.0 is not a non-negative number"),
    ("sample.py", ["--workdir={wd}", "--prompt=ROMEO:", "--temperature=nan"],
     "error: --temperature must be a finite number >= 0, got nan"),
    ("sample.py", ["--workdir={wd}", "--prompt=ROMEO:", "--num_new=-5"],
     "error: flag --num_new=-5: -5 is not a positive integer"),
    ("sample.py", ["--workdir={wd}", "--prompt=ROMEO:", "--num_new=0"],
     "error: flag --num_new=0: 0 is not a positive integer"),
    # No --prompt on a text model was an IndexError.
    ("sample.py", ["--workdir={wd}"],
     "error: {wd} was trained on text (data.name=shakespeare): pass a prompt to continue, e.g. "
     "--prompt='ROMEO:'"),
    ("sample.py", ["--workdir={wd}", "ROMEO:"],
     "error: unexpected argument 'ROMEO:'; pass the prompt as --prompt='...'"),
    ("sample.py", ["--workdir={tmp}/nowhere"],
     "error: workdir {tmp}/nowhere does not exist; train first with scripts/train.py --config=... "
     "--workdir={tmp}/nowhere"),
    ("sample.py", ["--workdir={tmp}"],
     "error: {tmp} has no config.json: not a memarch training workdir (train first with "
     "scripts/train.py --config=... --workdir={tmp})"),
    ("sample.py", ["--workdir="], "error: --workdir is empty; pass a directory, e.g. --workdir=runs/my_run"),
    ("sample.py", ["--workdir={tmp}/mqar", "--prompt=hello"],
     "error: {tmp}/mqar was trained on MQAR (token ids, no text): leave --prompt out to decode its "
     "test queries"),
    ("eval.py", ["--workdir="], "error: --workdir is empty; pass a directory, e.g. --workdir=runs/my_run"),
    ("eval.py", ["--workdir={wd}", "--lengths=1k"], "error: --lengths: '1k' is not an integer"),
    ("eval.py", ["--workdir={wd}", "--batch_size=0"],
     "error: flag --batch_size=0: 0 is not a positive integer"),
    # --config was silently ignored without --train_first.
    ("eval.py", ["--workdir={wd}", "--config={cfg}/transformer.py"],
     "error: --config is read only with --train_first (the workdir's config.json describes its "
     "model)"),
]


@pytest.mark.parametrize("script,args,line", FAST_CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])[:60]}" for c in FAST_CASES])
def test_bad_flags_and_workdirs_get_one_line(text_workdir, tmp_path, script, args, line):
  open(tmp_path / "a_file", "w").close()
  if "{tmp}/mqar" in " ".join(args):
    mqar_workdir(str(tmp_path))
  fill = dict(wd=text_workdir, tmp=str(tmp_path), cfg=CONFIGS, names=config_names())
  r = run_script(script, *[a.format(**fill) for a in args], cwd=str(tmp_path))
  assert_one_error(r, line.format(**fill))


def test_verbose_prints_the_traceback_then_the_line(tmp_path):
  r = run_script("sample.py", f"--workdir={tmp_path}", "--verbose", cwd=str(tmp_path))
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines[0] == "Traceback (most recent call last):" and len(lines) > 3
  assert lines[-1] == (f"error: {tmp_path} has no config.json: not a memarch training workdir (train "
                       f"first with scripts/train.py --config=... --workdir={tmp_path})")


def test_missing_text_file_and_sentencepiece_model_get_one_line(tmp_path):
  """These fail inside training's data set-up (FileNotFoundError: a traceback before)."""
  text = ["--config=" + os.path.join(CONFIGS, "transformer.py:task=text"), *TINY]
  r = run_script("train.py", *text, "--config.data.name=text",
                 f"--config.data.paths=('{tmp_path}/nope.txt',)", f"--workdir={tmp_path}/w1",
                 cwd=str(tmp_path))
  assert_one_error(r, f"error: no such text file '{tmp_path}/nope.txt'")
  r = run_script("train.py", *text, "--config.data.tokenizer=sentencepiece",
                 f"--config.data.spm_model={tmp_path}/nope.model", f"--workdir={tmp_path}/w2",
                 cwd=str(tmp_path))
  assert_one_error(r, f"error: SentencePiece model file not found: '{tmp_path}/nope.model' (set "
                   "data.spm_model to a local .model file)")


def test_long_prompt_warns_once_and_samples(text_workdir):
  prompt = "ROMEO: " * 6  # 42 byte tokens; trained on rows of 32
  r = run_script("sample.py", f"--workdir={text_workdir}", f"--prompt={prompt}", "--num_new=4",
                 cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert [l for l in r.stderr.splitlines() if l.strip()] == [
      "warning: the prompt is 42 tokens, longer than the 32 the model was trained on (data.seq_len); "
      "continuing, but it has never seen positions past 32"]
  assert r.stdout.startswith(prompt) and len(r.stdout.rstrip("\n")) >= len(prompt) + 1


def test_eval_with_every_checkpoint_unreadable_gets_one_line(text_workdir, tmp_path):
  """Orbax printed dozens of 'Event loop is closed' tracebacks before the message."""
  wd = str(tmp_path / "w")
  shutil.copytree(text_workdir, wd)
  data_files = glob.glob(os.path.join(wd, "checkpoints", "*", "state", "**", "d", "*"),
                         recursive=True)
  assert data_files
  for path in data_files:
    with open(path, "r+b") as f:
      n = len(f.read())
      f.seek(0)
      f.write(b"\x00garbage" * (n // 8 + 1))
  steps = ", ".join(sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int))
  r = run_script("eval.py", f"--workdir={wd}", "--evals=perplexity", "--lengths=32", cwd=ROOT)
  assert_one_error(r, f"error: no readable checkpoint in {wd}/checkpoints: every checkpoint (steps "
                   f"{steps}) failed to restore; train again or restore a copy")


def test_message_is_one_line_without_errno():
  """The boundary's formatting, for errors a subprocess cannot produce as root (a read-only
  workdir) or that arrive wrapped (a config file's traceback inside a flag error)."""
  from memarch import cli
  assert cli.message(PermissionError(13, "Permission denied", "/ro/w/checkpoints")) == (
      "/ro/w/checkpoints: Permission denied")
  assert cli.message(OSError(28, "No space left on device", "/w/metrics.jsonl")) == (
      "/w/metrics.jsonl: No space left on device")
  assert cli.message(ValueError("first\n  second")) == "first second"
  assert cli.message(TypeError("x")) == "TypeError: x (rerun with --verbose for the traceback)"
  assert cli.message(KeyError("no feature 'text'")) == "no feature 'text'"
  assert cli.message(KeyError("w_down")) == ("KeyError: 'w_down' (rerun with --verbose for the "
                                             "traceback)")


def test_orbax_task_noise_is_dropped_and_other_asyncio_errors_kept(monkeypatch):
  """A failed restore's sibling reads, garbage-collected after the error line, made asyncio log
  'Task exception was never retrieved' with a traceback (1 eval in 6 on this machine), and in a CI
  run 'Future exception was never retrieved' about a TensorStore read."""
  import asyncio
  import logging
  import warnings as warnings_module

  from absl import logging as absl_logging

  from memarch import cli
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  monkeypatch.setattr(warnings_module, "showwarning", warnings_module.showwarning)
  verbosity = absl_logging.get_verbosity()
  logger = logging.getLogger("asyncio")
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  handler = Keep()
  logger.addHandler(handler)
  loop = asyncio.new_event_loop()
  try:
    cli.quiet_libraries()

    class Orbax:
      def __repr__(self):
        return "<Task coro=<async_deserialize() defined at .../orbax/checkpoint/serialization.py>>"

    tensorstore = ("<Future finished exception=ValueError('DATA_LOSS: Error opening \"zarr\" "
                   "driver [tensorstore_spec=...]')>")
    for message, future in (("Task", Orbax()), ("Future", tensorstore),
                            ("Task", "<Task coro=<mine() defined at /w/mine.py>>")):
      loop.call_exception_handler({"message": f"{message} exception was never retrieved",
                                   "exception": ValueError("DATA_LOSS"), "future": future})
  finally:
    loop.close()
    logger.removeHandler(handler)
    logger.removeFilter(cli._orbax_task_noise)
    absl_logging.set_verbosity(verbosity)
  assert len(seen) == 1 and "mine.py" in seen[0], seen


def test_unawaited_coroutine_warning_is_dropped_and_our_warnings_kept(capsys):
  """A failed restore left Orbax's 'Store._get_array_metadatas' coroutine unawaited; its
  RuntimeWarning, printed when garbage-collected, broke the one-line error in a CI run."""
  from memarch import cli
  cli._show_warning(RuntimeWarning("coroutine 'Store._get_array_metadatas' was never awaited"),
                    RuntimeWarning, "asyncio/base_events.py", 1)
  cli._show_warning(RuntimeWarning("loss is nan at step 3"), RuntimeWarning, "memarch/train.py", 1)
  cli._show_warning(DeprecationWarning("old api"), DeprecationWarning, "lib.py", 1)
  assert capsys.readouterr().err.splitlines() == ["warning: loss is nan at step 3"]
