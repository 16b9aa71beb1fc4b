"""lm-evaluation-harness adapter: score a trained workdir on the harness's tasks (PIQA, HellaSwag,
LAMBADA, WikiText, ...; Gao et al. 2024, "The Language Model Evaluation Harness", github.com/
EleutherAI/lm-evaluation-harness) or on local task YAMLs.

  python scripts/eval.py --workdir=W --evals=harness --tasks=piqa,hellaswag --limit=100
  python scripts/eval.py --workdir=W --evals=harness --tasks=my_task --include_path=my_tasks/

The harness asks a model three kinds of questions; `WorkdirScorer` answers them with the workdir's
model and tokenizer through `memarch.evals.long_context.StreamingRunner`, so every input runs
`segment_len` tokens per call (the training length by default) with the recurrent state or KV cache
carried between calls, exactly as one long call would compute it:

- loglikelihood(context, continuation): requests sorted longest first and batched; the contexts are
  prefilled through the state (`StreamingRunner.prefill`), then every continuation is scored
  teacher-forced in one forward pass from that state (`StreamingRunner.continuation`). Returns the
  summed log-probability and whether greedy decoding would have produced the continuation. An empty
  context is the end-of-document token, the token that precedes every document in training.
- loglikelihood_rolling(text): log-probability of the whole text after the end-of-document token.
  By default one window per document, streamed through the state, so every token sees the whole
  document before it; `max_length=L` cuts documents into disjoint windows of L targets scored from a
  fresh state (`memarch.evals.perplexity.windows`), the harness's convention for fixed-context models.
- generate_until(context, {until, max_gen_toks}): greedy decoding through the state after the
  prefilled context (`StreamingRunner.greedy`), cut at the end-of-document token and at the first
  stop sequence. Sampling is refused (greedy only).

Text is tokenized as the harness's own models do: trailing whitespace of a context moves to the
start of its continuation, and the continuation's tokens are those of context + continuation after
the context's tokens. `max_length` (off by default) keeps only the last L tokens of long inputs.

`lm_eval` is imported only when the adapter class is built (`harness_lm`), so the rest of memarch
does not need it; install it with `pip install -e ".[eval]"`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np

from memarch.evals.long_context import StreamingRunner, _batches, _check_vocab
from memarch.evals.perplexity import IGNORE, windows
from memarch.evals.runner import EvalError

DEFAULT_MAX_GEN_TOKS = 256


class Generation(NamedTuple):
  """One generate_until request: context text, stop sequences, maximum new tokens."""
  context: str
  until: tuple[str, ...]
  max_new: int


def pad_width(n: int, segment_len: int) -> int:
  """Padded call width for rows of up to n tokens: the next power of two (at least 8, at most the
  segment) within one segment, else whole segments, so few shapes compile."""
  if n > segment_len:
    return -(-n // segment_len) * segment_len
  return min(max(8, 1 << (max(n, 1) - 1).bit_length()), segment_len)


class WorkdirScorer:
  """The harness's three request kinds answered by a model through its state (module docstring)."""

  def __init__(self, runner: StreamingRunner, tokenizer, *, batch_size: int = 8,
               max_length: int | None = None):
    _check_vocab(runner, tokenizer)
    self.runner, self.tok = runner, tokenizer
    self.batch_size = int(batch_size)
    self.max_length = int(max_length) if max_length else None
    if self.batch_size < 1 or (self.max_length is not None and self.max_length < 2):
      raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    self.prefix_id = int(tokenizer.eos_id)

  @classmethod
  def from_workdir(cls, workdir: str, *, segment_len: int | None = None, **kw) -> "WorkdirScorer":
    """Restores the newest checkpoint of `workdir` with its tokenizer; segments default to the
    config's evals.segment_len, else the training length."""
    from memarch.evals.runner import load_workdir, make_runner, workdir_tokenizer
    cfg, data, model, _ = load_workdir(workdir)
    ev = cfg.get("evals", None)
    seg = segment_len or (ev.get("segment_len") if ev is not None else None) or int(cfg.data.seq_len)
    return cls(make_runner(model, data, seg), workdir_tokenizer(cfg, data), **kw)

  # -- tokenization -------------------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in self.tok.encode(text)]

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids); an empty context is the end-of-document token."""
    if not context:
      return [self.prefix_id], self.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = self.encode(context)
    whole = self.encode(context + continuation)
    return ctx, whole[len(ctx):]

  def _truncate(self, ctx: list[int], keep_free: int) -> list[int]:
    """The context's last max_length - keep_free tokens (at least one) when max_length is set."""
    if self.max_length is None or len(ctx) + keep_free <= self.max_length:
      return ctx
    return ctx[-max(1, self.max_length - keep_free):]

  # -- the three request kinds --------------------------------------------------------------------

  def loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of the continuation's token log-probs, whether each token is the argmax) per pair."""
    pairs = [(self._truncate(list(c), len(x)), list(x)) for c, x in pairs]
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    todo = [i for i, (_, x) in enumerate(pairs) if x]
    for i in set(range(len(pairs))) - set(todo):
      out[i] = (0.0, True)  # an empty continuation
    todo.sort(key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), pairs[i][0] + pairs[i][1]))
    r = self.runner
    for idx, n in _batches(todo, self.batch_size):
      prompts = [np.asarray(pairs[i][0], np.int32) for i in idx]
      conts = [np.asarray(pairs[i][1], np.int32) for i in idx]
      # +8: continuation() pads its call to a multiple of 8 tokens after the prompt.
      max_len = r.stream_len(max(map(len, prompts)) + max(map(len, conts)) + 8)
      last, state = r.prefill([r.prompt_stream(p) for p in prompts], max_len=max_len)
      logp, hit, mask = r.continuation(state, last, conts, prompt_lens=[len(p) for p in prompts])
      for row, i in enumerate(idx[:n]):
        out[i] = (float(logp[row].sum()), bool(hit[row][mask[row]].all()))
    return out

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """Log-probability of each text after the end-of-document token (module docstring)."""
    rows = []  # (text index, inputs, targets)
    for d, text in enumerate(texts):
      ids = np.asarray([self.prefix_id] + self.encode(text), np.int32)
      length = self.max_length or max(ids.size - 1, 1)
      rows += [(d, x, y) for x, y in windows([ids], length)]
    rows.sort(key=lambda row: -row[1].size)
    total = np.zeros(len(texts), np.float64)
    for batch, n in _batches(rows, self.batch_size):
      width = pad_width(batch[0][1].size, self.runner.segment_len)
      x = np.zeros((len(batch), width), np.int32)
      y = np.full((len(batch), width), IGNORE, np.int32)
      for row, (_, inp, tgt) in enumerate(batch):
        x[row, :inp.size], y[row, :tgt.size] = inp, tgt
      nll = self.runner.score(x, y, max_len=width)
      for row, (d, _, _) in enumerate(batch[:n]):
        total[d] -= nll[row].sum()
    return [float(t) for t in total]

  def generate_until(self, requests: Sequence[Generation]) -> list[str]:
    """Greedy continuation of each context, cut at end-of-document and the first stop sequence."""
    out: list[str | None] = [None] * len(requests)
    prompts = [self._truncate(self.encode(g.context) or [self.prefix_id], g.max_new)
               for g in requests]
    r = self.runner
    by_new: dict[int, list[int]] = {}
    for i, g in enumerate(requests):
      by_new.setdefault(int(g.max_new), []).append(i)
    for max_new, items in by_new.items():
      items.sort(key=lambda i: -len(prompts[i]))
      for idx, n in _batches(items, self.batch_size):
        ps = [np.asarray(prompts[i], np.int32) for i in idx]
        last, state = r.prefill([r.prompt_stream(p) for p in ps],
                                max_len=r.stream_len(max(map(len, ps)) + max_new))
        toks = r.greedy(state, last, max_new)
        for row, i in enumerate(idx[:n]):
          ids = [int(t) for t in toks[row]]
          if self.prefix_id in ids:
            ids = ids[:ids.index(self.prefix_id)]
          text = self.tok.decode(np.asarray(ids, np.int32))
          cut = min([text.index(s) for s in requests[i].until if s and s in text], default=len(text))
          out[i] = text[:cut]
    return out


def generation(context: str, gen_kwargs: dict | None) -> Generation:
  """A harness generate_until request's arguments as a Generation (greedy only)."""
  kw = dict(gen_kwargs or {})
  if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0.0:
    raise ValueError("the memarch adapter decodes greedily only; the task asks for sampling "
                     f"({kw}); set do_sample: false")
  until = kw.get("until") or ()
  until = (until,) if isinstance(until, str) else tuple(until)
  return Generation(context, until, int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))


@functools.cache
def lm_class():
  """`MemarchLM`, a subclass of `lm_eval.api.model.LM` over a `WorkdirScorer`, registered with the
  harness as model "memarch" (model_args: workdir=W,batch_size=8,segment_len=...,max_length=...)."""
  try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
  except ImportError:
    raise EvalError("the harness eval needs lm-evaluation-harness: pip install -e '.[eval]' "
                    "(or pip install lm-eval)") from None

  class MemarchLM(LM):
    """A memarch workdir as a harness model (see memarch.evals.harness)."""

    def __init__(self, workdir: str | None = None, scorer: WorkdirScorer | None = None,
                 batch_size: int | str = 8, segment_len: int | None = None,
                 max_length: int | None = None, **unused):
      super().__init__()
      if scorer is None:
        if not workdir:
          raise EvalError("the memarch harness model needs model_args workdir=<training workdir>")
        bs = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        scorer = WorkdirScorer.from_workdir(workdir, segment_len=int(segment_len or 0) or None,
                                            batch_size=bs, max_length=max_length)
      self.scorer = scorer

    @property
    def tokenizer_name(self) -> str:
      return getattr(self.scorer.tok, "name", type(self.scorer.tok).__name__)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      res = self.scorer.loglikelihood([self.scorer.encode_pair(*q.args) for q in requests])
      for q, x in zip(requests, res):
        self.cache_hook.add_partial("loglikelihood", q.args, x)
      return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      res = self.scorer.loglikelihood_rolling([q.args[0] for q in requests])
      for q, x in zip(requests, res):
        self.cache_hook.add_partial("loglikelihood_rolling", q.args, x)
      return res

    def generate_until(self, requests, disable_tqdm: bool = False):
      res = self.scorer.generate_until([generation(*q.args) for q in requests])
      for q, x in zip(requests, res):
        self.cache_hook.add_partial("generate_until", q.args, x)
      return res

  register_model("memarch")(MemarchLM)
  return MemarchLM


def harness_lm(workdir: str | None = None, **kw):
  """The adapter over `workdir` (or `scorer=WorkdirScorer(...)`), for `lm_eval.simple_evaluate`."""
  return lm_class()(workdir=workdir, **kw)


def metric_rows(results: dict) -> list[dict]:
  """Flat (task, metric, value, stderr) rows of a simple_evaluate result (filters named as the
  harness does: `acc,none` -> metric acc)."""
  rows = []
  for task, metrics in sorted(results.get("results", {}).items()):
    for key, value in sorted(metrics.items()):
      name, comma, filt = key.partition(",")  # "acc,none"; keys without a filter are not metrics
      if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
        continue
      stderr = metrics.get(f"{name}_stderr,{filt}")
      rows.append({"task": task, "metric": name if filt in ("", "none") else f"{name} ({filt})",
                   "value": float(value),
                   "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
  return rows


def run_harness(scorer: WorkdirScorer, tasks: Sequence[str], *, limit: float | None = None,
                include_path: Sequence[str] | None = None, num_fewshot: int | None = None,
                bootstrap_iters: int = 1000, log_samples: bool = False, seed: int = 0,
                log: Callable[[str], None] | None = None) -> dict:
  """`lm_eval.simple_evaluate` of the adapter on `tasks` (harness names, or tasks defined by YAMLs
  under `include_path`); returns its result dict with `rows` (metric_rows) added."""
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  lm = lm_class()(scorer=scorer)
  # Bootstrapped standard errors run in this process: the harness would otherwise fork a pool of
  # workers from a process whose JAX runtime already has threads.
  os.environ.setdefault("DISABLE_MULTIPROC", "1")
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  paths = [os.path.abspath(p) for p in include_path or []]
  for p in paths:
    if not os.path.isdir(p):
      raise EvalError(f"--include_path {p} is not a folder of task YAMLs")
  tm = None
  if paths:  # indexing the harness's own ~15k task YAMLs takes 15-30 s: skip it when it is not needed
    try:
      tm = TaskManager(include_path=paths, include_defaults=False)
    except TypeError:  # an lm-eval without include_defaults
      tm = None
    if tm is not None and not set(tasks) <= set(tm.all_tasks):
      tm = None
  tm = tm or TaskManager(include_path=paths or None)
  known = set(tm.all_tasks)
  missing = [t for t in tasks if t not in known]
  if missing:
    raise EvalError(f"unknown harness task {missing[0]!r}: not a task of lm-eval nor of a YAML under "
                    "--include_path (lm-eval --tasks list shows the names)")
  if limit is not None and limit <= 0:
    raise EvalError(f"--limit must be positive, got {limit}")
  t0 = time.time()
  res = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=tm,
                        num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                        fewshot_random_seed=seed)
  if res is None:
    raise EvalError("lm-eval returned no results")
  res["rows"] = metric_rows(res)
  res["wall_sec"] = time.time() - t0
  for row in res["rows"]:
    err = f" +- {_fmt(row['stderr'])}" if row["stderr"] is not None else ""
    log(f"harness {row['task']} {row['metric']}: {_fmt(row['value'])}{err}")
  return res


def _fmt(x) -> str:
  if x is None or math.isnan(x):
    return ""
  return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def markdown(rows: Sequence[dict], title: str) -> str:
  """A markdown table of metric_rows."""
  lines = [f"# {title}", "", "| task | metric | value | stderr |", "|---|---|---|---|"]
  lines += [f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['stderr'])} |"
            for r in rows]
  return "\n".join(lines) + "\n"


def to_json(res: dict) -> dict:
  """The parts of a simple_evaluate result worth keeping, JSON-safe."""
  keep = {k: res[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples",
                              "rows", "wall_sec", "samples") if k in res}
  return json.loads(json.dumps(keep, default=str))
