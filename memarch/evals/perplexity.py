"""Held-out language-modelling quality against context length: bits per byte at 512, 2k, 8k, ...

`evaluate_perplexity` scores documents (the training source's held-out split, or local files) at each
context length L. Every document (its tokens and EOS) is cut into consecutive windows of L + 1 tokens
with stride L, the way training rows are cut, and each window is scored from a fresh state: every token
of a document except its first is a target exactly once at every length, so the lengths score the same
tokens and differ only in how much of the document each token sees (on average L / 2 tokens). Windows
never cross documents, so no segment ids are needed.

Windows longer than the training length run through the model `segment_len` tokens at a time (the
training length by default) with every layer's recurrent state or KV cache carried between calls
(`StreamingRunner.score`), exactly as one long call would compute them. A model whose layers cannot
carry state (they raise NotImplementedError) is scored in single calls of at most its training length
instead; its rows say so (`streamed: false`, `scored_length`).

Bits per byte = (sum of the targets' negative log-likelihoods in nats) / ln 2 / (UTF-8 bytes those
targets stand for, `tokenizer.token_bytes`; an EOS stands for 0 bytes but its loss counts), so byte-level
and BPE models compare. `loss` is nats per token and `perplexity` = exp(loss), per token.

Results go to `<workdir>/eval/perplexity.json`, a list of rows {"length", "bits_per_byte", "loss",
"tokens", ...}; a later run merges its rows in (same source and length: replaced) instead of
overwriting, and `perplexity.png` plots bits per byte against context length.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memarch.evals.long_context import StreamingRunner
from memarch.evals.plots import save_figure

IGNORE = -100


def windows(docs: Sequence[np.ndarray], length: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(inputs, targets) of every window of `length` + 1 tokens, stride `length`, of every document."""
  out = []
  for d in docs:
    d = np.asarray(d, np.int32)
    for start in range(0, d.size - 1, length):
      chunk = d[start:start + length + 1]
      out.append((chunk[:-1], chunk[1:]))
  return out


def cap_documents(docs: Sequence[np.ndarray], max_tokens: int) -> list[np.ndarray]:
  """Each document cut to its first max_tokens // len(docs) + 1 tokens (max_tokens <= 0: all)."""
  if not max_tokens or max_tokens <= 0:
    return [np.asarray(d) for d in docs]
  per_doc = max(1, int(max_tokens) // max(len(docs), 1))
  return [np.asarray(d)[:per_doc + 1] for d in docs]


def _plain_scorer(model):
  """Single-call scoring without a state (for models that cannot stream)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def nll(params, tokens_BT, targets_BT):
    logits, _ = nnx.merge(graphdef, params)(tokens_BT)
    mask = targets_BT >= 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    out = -jnp.take_along_axis(logp, jnp.where(mask, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, out, 0.0)

  return lambda tokens, targets, max_len=None: np.asarray(
      nll(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(targets, jnp.int32)), np.float64)


def score_windows(score_fn, wins, length: int, token_bytes: np.ndarray, batch_size: int):
  """(total nats, target tokens, target bytes) over `wins`, `batch_size` rows padded to `length`
  per call (padding sits after every real token and has target -100)."""
  nats, tokens, nbytes = 0.0, 0, 0
  for i in range(0, len(wins), batch_size):
    chunk = wins[i:i + batch_size]
    x = np.zeros((batch_size, length), np.int32)
    y = np.full((batch_size, length), IGNORE, np.int32)
    for r, (inp, tgt) in enumerate(chunk):
      x[r, :inp.size], y[r, :tgt.size] = inp, tgt
    nll = score_fn(x, y, max_len=length)
    mask = y != IGNORE
    nats += float(nll[mask].sum())
    tokens += int(mask.sum())
    nbytes += int(np.asarray(token_bytes)[y[mask]].sum())
  return nats, tokens, nbytes


def evaluate_perplexity(model, docs: Sequence[np.ndarray], *, lengths: Sequence[int], train_len: int,
                        token_bytes: np.ndarray, segment_len: int | None = None, batch_size: int = 8,
                        source: str = "", log: Callable[[str], None] | None = None) -> list[dict]:
  """One row per length (module docstring): bits_per_byte, loss (nats per token), perplexity,
  tokens, bytes, segment_len, streamed, scored_length, source."""
  segment_len = int(segment_len or train_len)
  runner = StreamingRunner(model, segment_len=segment_len)
  vocab = runner.vocab_size
  if np.asarray(token_bytes).size > vocab:
    raise ValueError(f"the model's vocabulary ({vocab}) is smaller than the tokenizer's "
                     f"({np.asarray(token_bytes).size}): it was not trained with this tokenizer")
  plain = None
  rows = []
  for length in lengths:
    length = int(length)
    if length < 1:
      raise ValueError(f"context lengths must be positive, got {length}")
    t0 = time.time()
    streamed, scored = True, length
    try:
      nats, tokens, nbytes = score_windows(runner.score, windows(docs, length), length, token_bytes,
                                           batch_size)
    except NotImplementedError as e:
      streamed, scored = False, min(length, int(train_len))
      if log:
        log(f"perplexity: the model cannot carry its state ({str(e).splitlines()[0]}); length "
            f"{length} is scored in single calls of {scored} tokens")
      plain = plain or _plain_scorer(model)
      nats, tokens, nbytes = score_windows(plain, windows(docs, scored), scored, token_bytes,
                                           batch_size)
    loss = nats / max(tokens, 1)
    row = {"length": length, "scored_length": scored, "streamed": streamed,
           "bits_per_byte": nats / math.log(2) / max(nbytes, 1), "loss": loss,
           "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "bytes": nbytes,
           "segment_len": segment_len if streamed else scored, "source": source}
    rows.append(row)
    if log:
      log(f"perplexity {source} length {length}: {row['bits_per_byte']:.4f} bits/byte, loss "
          f"{loss:.4f} nats/token ({tokens} tokens, {time.time() - t0:.1f}s)")
  return rows


def merge_rows(path: str, rows: Sequence[dict]) -> list[dict]:
  """Rows already in `path` (a JSON list) with `rows` merged in: a new row replaces an old one of the
  same source and length. Written back sorted by source, then length; returns the merged list."""
  old = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = []
    if not isinstance(old, list):
      old = []
  key = lambda r: (str(r.get("source", "")), int(r["length"]))  # noqa: E731
  merged = {key(r): r for r in old if isinstance(r, dict) and "length" in r}
  merged.update({key(r): dict(r) for r in rows})
  out = [merged[k] for k in sorted(merged)]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return out


def plot(rows: Sequence[dict], png_path: str, *, title: str = "", train_len: int | None = None) -> str:
  """Bits per byte against context length (log2 axis), one line per source."""
  from memarch.evals.plots import _plt, _wrap  # pylint: disable=import-outside-toplevel
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for i, src in enumerate(dict.fromkeys(str(r.get("source", "")) for r in rows)):
    pts = sorted((r["length"], r["bits_per_byte"], r.get("streamed", True)) for r in rows
                 if str(r.get("source", "")) == src)
    xs, ys, ok = zip(*pts)
    ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=src or "held-out")
    for x, y, streamed in pts:
      ax.annotate(f"{y:.3f}" + ("" if streamed else "*"), (x, y), textcoords="offset points",
                  xytext=(0, 5), ha="center", fontsize=7)
  if train_len:
    ax.axvline(train_len, color="gray", ls="--", lw=0.8, label=f"training length {train_len}")
  ax.set_xscale("log", base=2)
  ticks = sorted({int(r["length"]) for r in rows})
  ax.set_xticks(ticks, [f"{t:,}" for t in ticks], fontsize=7)
  ax.minorticks_off()
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("bits per byte")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(_wrap(title + ("\n* not streamed: scored at the training length"
                              if not all(r.get("streamed", True) for r in rows) else "")),
               fontsize=8)
  return save_figure(fig, png_path)
