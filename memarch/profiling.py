"""Where a training step's time goes: per-op times from a jax.profiler trace, grouped by source.

`build_train_step` compiles the training step of a config on random tokens (shared with
scripts/bench.py, so the profiled step is the benchmarked one). `op_breakdown` runs it under
`jax.profiler.trace`, reads the per-op events of the trace (XLA:CPU records one event per executed
HLO op or fusion, GPU one per kernel) and attributes each op to the source line that produced it
(the HLO metadata of the compiled step) and to a phase: forward, backward (ops under `transpose`),
or recompute (forward ops replayed inside the backward by `jax.checkpoint`). Times are summed over
threads, so they add up to CPU time, not wall time. scripts/profile_step.py prints the table.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import NamedTuple

import jax

_META = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s"}]+))')


def _fields(text: str) -> dict[str, str]:
  return {k: a or b for k, a, b in _FIELD.findall(text)}


class CompiledStep(NamedTuple):
  compiled: object      # the compiled jitted step: fn(state, batch) -> (state, metrics)
  state: object         # the split (model, optimizer) state it starts from (donated per call)
  batch: dict           # {"inputs", "targets"} random tokens [B, T]
  params: int
  compile_s: float


def apply_overrides(cfg, overrides=None):
  """`cfg` with {'model.remat': 'full', 'model.mixer.titans_mac.num_persistent': 16, ...} set (dotted
  paths of any depth), validated again; an unknown path is a KeyError naming it."""
  if not overrides:
    return cfg
  from memarch import configs_lib
  cfg.unlock()
  for key, value in overrides.items():
    *path, name = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    if name not in node:
      raise KeyError(f"override {key!r}: no field {name!r} there")
    node[name] = value
  cfg.lock()
  configs_lib.validate(cfg)
  return cfg


def build_train_step(spec: str, batch: int, seq_len: int, overrides=None,
                     collect_stats: bool = False) -> CompiledStep:
  """The config's jitted training step (optimizer, accumulation and auxiliary losses included),
  compiled once for random tokens [batch, seq_len]; `overrides` {'model.remat': 'full', ...}."""
  from flax import nnx

  from memarch import configs_lib
  from memarch import step as step_lib
  from memarch.lm import LM, count_params
  from memarch.optim import make_optimizer
  from memarch.sharding import mesh_context
  cfg = apply_overrides(configs_lib.load_config(spec), overrides)
  lm_cfg = configs_lib.lm_config(cfg, cfg.data.vocab_size)
  with mesh_context():
    model = LM(lm_cfg, rngs=nnx.Rngs(0))
    tx = make_optimizer(configs_lib.opt_config(cfg), cfg.train.num_steps, model)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  n_params = count_params(model)
  graphdef, state = nnx.split((model, opt))
  del model, opt
  step_fn = step_lib.jit_train_step(graphdef, step_lib.StepConfig.from_config(cfg, packed=False))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0, lm_cfg.vocab_size)
  batch_ = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_, collect_stats).compile()
  return CompiledStep(compiled, state, batch_, n_params, time.perf_counter() - t0)


def _table(hlo_text: str, name: str) -> dict[int, str]:
  """One of the module's stack-frame tables ('FileNames', ...): id -> its line's text."""
  i = hlo_text.find(f"\n{name}\n")
  out = {}
  if i < 0:
    return out
  for line in hlo_text[i + len(name) + 2:].splitlines():
    head, _, rest = line.partition(" ")
    if not head.isdigit():
      break
    out[int(head)] = rest.strip().strip('"{}')
  return out


def op_sources(hlo_text: str) -> dict[str, tuple[str, list[tuple[str, str, int]]]]:
  """HLO instruction name -> (op_name, its Python stack innermost first as (file, function,
  line)), from the compiled module's metadata and stack-frame tables."""
  files, funcs = _table(hlo_text, "FileNames"), _table(hlo_text, "FunctionNames")
  locs = {k: _fields(v) for k, v in _table(hlo_text, "FileLocations").items()}
  frames = {k: _fields(v) for k, v in _table(hlo_text, "StackFrames").items()}

  def stack(frame_id: int):
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc = locs.get(int(frames[frame_id]["file_location_id"]), {})
      out.append((files.get(int(loc.get("file_name_id", 0)), "?"),
                  funcs.get(int(loc.get("function_name_id", 0)), "?"), int(loc.get("line", 0))))
      frame_id = int(frames[frame_id]["parent_frame_id"])
    return out

  out = {}
  for line in hlo_text.splitlines():
    m = _META.match(line)
    if not m:
      continue
    fields = _fields(m.group(2))
    sid = fields.get("stack_frame_id")
    out[m.group(1)] = (fields.get("op_name", ""), stack(int(sid)) if sid else [])
  return out


def phase_of(op_name: str) -> str:
  """'backward' for ops under a transpose (the backward pass, jax.checkpoint recomputes included),
  else 'forward' (the forward pass, the optimizer update)."""
  return "backward" if "transpose(" in op_name else "forward"


class OpTime(NamedTuple):
  phase: str            # forward / backward
  path: str             # the innermost frame inside the repository ('' when none)
  function: str
  line: int
  seconds: float        # per step, summed over threads
  count: int            # executed ops per step


def _where(stack, root: str) -> tuple[str, str, int]:
  """The innermost frame inside the repository: (relative path, function, line)."""
  for path, func, line in stack:
    if path.startswith(root) and "/site-packages/" not in path:
      return os.path.relpath(path, root), func, line
  return "", "(outside the repository)", 0


def op_breakdown(step: CompiledStep, iters: int = 5, warmup: int = 2):
  """Runs the step `iters` times under the profiler; returns ([OpTime] by time, wall seconds per
  step under the profiler). Per-op times are summed over threads, so they add up to CPU time."""
  from jax.profiler import ProfileData
  state = step.state
  for _ in range(warmup):
    state, m = step.compiled(state, step.batch)
    jax.block_until_ready(m)
  with tempfile.TemporaryDirectory(prefix="memarch_profile_") as logdir:
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir):
      for _ in range(iters):
        state, m = step.compiled(state, step.batch)
        jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / iters
    sources = op_sources(step.compiled.as_text())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seconds, counts = collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
      for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
          for ev in line.events:
            if ev.name not in sources:
              continue
            op_name, stack = sources[ev.name]
            key = (phase_of(op_name), *_where(stack, root))
            seconds[key] += ev.duration_ns * 1e-9 / iters
            counts[key] += 1
  rows = [OpTime(*k, seconds[k], round(counts[k] / iters)) for k in seconds]
  return sorted(rows, key=lambda r: -r.seconds), wall
