"""Long-context evaluation through the recurrent state: BABILong-style qa1-qa5, passkey and S-NIAH-1.

Passkey (Mohtashami & Jaggi 2023), RULER NIAH (Hsieh et al. 2024) and BABILong (Kuratov et al.
2024). A long input is never fed in one call: `StreamingRunner` runs the model `segment_len` tokens
at a time and carries every layer's `state` between calls, so activation memory is bounded by the
segment, and what the model remembers about earlier segments is exactly what its state holds (split
invariance, docs/design.md, makes this equal to one full pass; tests/memarch/evals/test_long_context.py
checks it). Fixed-size states (Gated DeltaNet, Titans, MoM) stay the same size at any length; full
attention keeps a KV cache of `max_len` = prompt + answer tokens, which `init_state(max_len=...)`
preallocates.

Batches of prompts with different lengths [ours]: the prompt of example b is cut into n_b = len_b //
segment_len full segments and then the binary digits of the remainder (e.g. 300 = 256 + 32 + 8 + 4 with
segment_len 512). Stage k of a batch is one call of fixed length; rows that have no piece of that
length in their decomposition keep their previous state (a per-row select on every state leaf, which
all have the batch as leading axis). So a batch needs at most max_n + log2(segment_len) calls of at most
log2(segment_len) + 1 distinct shapes, and every row sees exactly its own tokens.

Metrics (all teacher-forced unless stated; names as the reference asks results to be labelled):

- BABILong-style qaN (memarch generator, procedural noise, byte tokenizer) at length X: restricted
  argmax over the task's label set [ours] instead of BABILong's free-form
  label match. After "...\\nQuestion: {q}\\nAnswer: " every label's tokens are scored teacher-forced
  (sum of token log-likelihoods, so the whole label is scored, not only its first token); the label with
  the highest log-likelihood is the prediction.
- Passkey (Mohtashami & Jaggi 2023): teacher-forced exact match of the key's digits (every digit is
  the argmax given the prompt and the previous digits), swept over depth x length.
- S-NIAH-1 (RULER): `accuracy` is the teacher-forced exact match of the answer ("v1, v2"); `score` is
  RULER's `string_match_all` on greedy decoding of as many tokens as the answer has, mean x 100.

Landmark tokens: a runner made with `landmark_block=L` (models trained on rows in landmark
attention's layout, `data.landmark_block`) feeds every prompt and continuation in that layout, a
landmark after every L - 1 content tokens counted from the prompt's start (`layers.landmark.
insert_landmarks`), and scores each content token from the logits of the content token before it,
skipping landmarks, as the training targets do. Greedy decoding does not insert landmarks, so such a
runner refuses `greedy` (S-NIAH's string_match score).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.landmark import stream_index
from memarch.data import babilong, needle
from memarch.data.tokenizer import ByteTokenizer
from memarch.evals import metrics as string_metrics

# Examples are drawn from split 1; the training sources use split 0, so no eval example was trained on.
EVAL_SPLIT = 1
MAX_LEN_QUANTUM = 128


def _select_rows(active_B, new, old):
  """new where the row is active, else old, for every state leaf (batch-leading by convention)."""
  def sel(n, o):
    if n.shape != o.shape or n.shape[:1] != active_B.shape:
      raise ValueError(f"state leaf changed shape {o.shape} -> {n.shape} or lacks the batch axis "
                       f"{active_B.shape[0]}; mixer states must keep shapes and lead with the batch")
    return jnp.where(active_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, o.astype(n.dtype))
  return jax.tree.map(sel, new, old)


def repeat_rows(tree, n: int):
  """Each row of every leaf repeated n times consecutively (state for n continuations per row)."""
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def _pieces(length: int, segment_len: int) -> tuple[int, list[int]]:
  """(number of full segments, powers of two of the remainder, largest first)."""
  n, r = divmod(length, segment_len)
  return n, [1 << j for j in range(r.bit_length() - 1, -1, -1) if r >> j & 1]


class StreamingRunner:
  """Runs an `LM` segment by segment through its recurrent state, jitting each call shape once.

  `run_segments` is the plain form (equal-length rows, all logits); `prefill` handles a batch of
  prompts of different lengths and returns the logits at each prompt's last token and the state after
  it; `continuation` scores teacher-forced continuations from that state; `greedy` decodes.
  """

  def __init__(self, model, *, segment_len: int = 512, landmark_block: int = 0,
               landmark_id: int | None = None):
    if segment_len < 1:
      raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    if landmark_block and (landmark_block < 2 or landmark_id is None):
      raise ValueError(f"landmark_block={landmark_block} needs a block >= 2 and a landmark_id")
    self.segment_len = int(segment_len)
    self.vocab_size = int(model.cfg.vocab_size)
    self.landmark_block, self.landmark_id = int(landmark_block), landmark_id
    self.graphdef, self.params = nnx.split(model)
    gd = self.graphdef

    def call(params, tokens_BT, state):
      return nnx.merge(gd, params)(tokens_BT, state=state)

    # Float64 models (exactness tests) keep float64 caches; otherwise states are float32.
    state_dtype = jnp.float64 if model.cfg.dtype == "float64" else jnp.float32

    def init(params, batch_size, max_len):
      return nnx.merge(gd, params).init_state(batch_size, max_len=max_len, dtype=state_dtype)

    # One jitted step serves every use (plain segments, masked prefill stages, teacher forcing), so
    # each call shape compiles once.
    def masked(params, tokens_BT, state, active_B, last_BV):
      logits, new = call(params, tokens_BT, state)
      return (logits, _select_rows(active_B, new, state),
              jnp.where(active_B[:, None], logits[:, -1], last_BV))

    def greedy(params, state, last_BV, num_new):
      def step(carry, _):
        logits_BV, state = carry
        tok = jnp.argmax(logits_BV, -1).astype(jnp.int32)
        logits, state = call(params, tok[:, None], state)
        return (logits[:, -1], state), tok
      _, toks = jax.lax.scan(step, (last_BV, state), None, length=num_new)
      return toks.T

    def nll(params, tokens_BT, targets_BT, state):
      logits, new = call(params, tokens_BT, state)
      mask = targets_BT >= 0
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      out = -jnp.take_along_axis(logp, jnp.where(mask, targets_BT, 0)[..., None], axis=-1)[..., 0]
      return jnp.where(mask, out, 0.0), new

    self._init = jax.jit(init, static_argnums=(1, 2))
    self._masked = jax.jit(masked)
    self._nll = jax.jit(nll)
    self._greedy = jax.jit(greedy, static_argnums=3)

  def init_state(self, batch_size: int, max_len: int):
    """State for `max_len` tokens, rounded up to a multiple of MAX_LEN_QUANTUM so batches whose
    prompts differ by a few tokens share one KV-cache shape (and one compilation)."""
    max_len = -(-int(max_len) // MAX_LEN_QUANTUM) * MAX_LEN_QUANTUM
    return self._init(self.params, int(batch_size), max_len)

  def run_segments(self, tokens_BT, *, state=None, max_len: int | None = None):
    """(logits_BTV, state) of `tokens_BT` fed `segment_len` tokens per call, starting from `state`
    (default: `init_state(max_len or T)`; full attention needs max_len >= every token it will see)."""
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    b, t = tokens_BT.shape
    if state is None:
      state = self.init_state(b, max_len or t)
    outs = []
    active = jnp.ones((b,), bool)
    last = jnp.zeros((b, self.vocab_size), jnp.float32)
    for s in range(0, t, self.segment_len):
      logits, state, last = self._masked(self.params, tokens_BT[:, s:s + self.segment_len], state,
                                         active, last)
      outs.append(logits)
    return jnp.concatenate(outs, axis=1), state

  def score(self, tokens_BT, targets_BT, *, max_len: int | None = None) -> np.ndarray:
    """Negative log-likelihood [B, T] of each target (0 where the target is negative, i.e. ignored)
    with `tokens_BT` fed `segment_len` tokens per call through the state; only one segment's logits
    exist at a time, so long rows need no [B, T, V] array."""
    tokens_BT = np.asarray(tokens_BT, np.int32)
    targets_BT = np.asarray(targets_BT, np.int32)
    b, t = tokens_BT.shape
    state = self.init_state(b, max_len or t)
    outs = []
    for s in range(0, t, self.segment_len):
      nll, state = self._nll(self.params, jnp.asarray(tokens_BT[:, s:s + self.segment_len]),
                             jnp.asarray(targets_BT[:, s:s + self.segment_len]), state)
      outs.append(np.asarray(nll, np.float64))
    return np.concatenate(outs, axis=1)

  def prefill(self, prompts: Sequence[np.ndarray], *, max_len: int):
    """(logits at each prompt's last token [B, V], state after each prompt) for prompts of any
    lengths, in at most max_n + log2(segment_len) calls (module docstring)."""
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
      raise ValueError("prefill needs non-empty prompts")
    if max(lengths) > max_len:
      raise ValueError(f"a prompt of {max(lengths)} tokens exceeds max_len={max_len}")
    b = len(prompts)
    pieces = [[self.segment_len] * n + bits
              for n, bits in (_pieces(m, self.segment_len) for m in lengths)]
    r_max = max(m % self.segment_len for m in lengths)
    stages = ([self.segment_len] * max(m // self.segment_len for m in lengths)
              + [1 << j for j in range(r_max.bit_length() - 1, -1, -1)])
    state = self.init_state(b, max_len)
    last = jnp.zeros((b, self.vocab_size), jnp.float32)
    offset = np.zeros(b, np.int64)
    nxt = np.zeros(b, np.int64)
    for c in stages:
      # Pieces come in stage order (full segments, then powers of two largest first), so a row is
      # active exactly when its next piece has this stage's length.
      active = np.array([nxt[i] < len(pieces[i]) and pieces[i][nxt[i]] == c for i in range(b)])
      if not active.any():
        continue
      tokens = np.zeros((b, c), np.int32)
      for i in np.nonzero(active)[0]:
        tokens[i] = prompts[i][offset[i]:offset[i] + c]
        offset[i] += c
        nxt[i] += 1
      _, state, last = self._masked(self.params, jnp.asarray(tokens), state, jnp.asarray(active),
                                    last)
    assert (offset == np.asarray(lengths)).all(), (offset, lengths)
    return last, state

  def _stream(self, tokens: np.ndarray, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stream tokens, stream index of each content token) of content tokens that begin at content
    index `start` of their sequence: landmarks after every L - 1 content tokens (identity without)."""
    tokens = np.asarray(tokens, np.int32)
    idx = start + np.arange(len(tokens))
    if not self.landmark_block:
      return tokens, idx - start
    dst = stream_index(idx, self.landmark_block)
    stream = np.full(dst[-1] + 1 - dst[0], self.landmark_id, np.int32)
    stream[dst - dst[0]] = tokens
    return stream, dst - dst[0]

  def stream_len(self, num_content: int) -> int:
    """Stream tokens (landmarks included) that `num_content` content tokens may take."""
    b = self.landmark_block
    return num_content + (num_content // (b - 1) + 1 if b else 0)

  def prompt_stream(self, prompt: np.ndarray) -> np.ndarray:
    """The tokens fed for a prompt (in the landmark layout: without a trailing landmark, which
    belongs to the continuation)."""
    stream, pos = self._stream(prompt)
    return stream[:pos[-1] + 1]

  def continuation(self, state, last_BV, conts: Sequence[np.ndarray], *,
                   prompt_lens: Sequence[int] | None = None, pad_to: int = 8):
    """Teacher-forced scores of continuation b after row b's prompt (state, last_BV from `prefill`;
    `prompt_lens`, the prompts' content lengths, places the landmarks of a landmark runner).

    Returns (token log-probs [B, A], argmax-equals-token [B, A], mask [B, A]) with A the longest
    continuation; the call length is rounded up to `pad_to` so few shapes compile (padding sits after
    every real token, so causality keeps it from changing their scores)."""
    a = max(len(c) for c in conts)
    if a < 1:
      raise ValueError("continuations must be non-empty")
    if self.landmark_block and prompt_lens is None:
      raise ValueError("a landmark runner needs prompt_lens to place the continuation's landmarks")
    b = len(conts)
    tok = np.zeros((b, a), np.int32)
    mask = np.zeros((b, a), bool)
    feeds, preds = [], np.zeros((b, a), np.int64)  # preds: index into [last, feed...] per token
    for i, c in enumerate(conts):
      tok[i, :len(c)], mask[i, :len(c)] = c, True
      # The stream after the prompt's last content token, up to (not including) the last token;
      # token j is predicted where its preceding content token was fed (0 = the prompt's last).
      stream, pos = self._stream(np.concatenate([[0], c]), (prompt_lens[i] - 1) if prompt_lens
                                 is not None else 0)
      feeds.append(stream[1:pos[-1]])
      preds[i, :len(c)] = pos[:-1]
    logits = last_BV[:, None]
    w = max(len(f) for f in feeds)
    if w:
      width = -(-w // pad_to) * pad_to
      inp = np.zeros((b, width), np.int32)
      for i, f in enumerate(feeds):
        inp[i, :len(f)] = f
      more, _, _ = self._masked(self.params, jnp.asarray(inp), state, jnp.ones((b,), bool), last_BV)
      logits = jnp.concatenate([logits, more], axis=1)
    logits = jnp.take_along_axis(logits, jnp.asarray(preds)[..., None], axis=1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_logp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tok)[..., None], -1)[..., 0])
    hit = np.asarray(jnp.argmax(logits, -1)) == tok
    return np.where(mask, tok_logp, 0.0), hit & mask, mask

  def greedy(self, state, last_BV, num_new: int) -> np.ndarray:
    """[B, num_new] greedy tokens following each prompt."""
    if self.landmark_block:
      raise NotImplementedError("greedy decoding does not insert landmark tokens; score landmark "
                                "models teacher-forced (passkey, NIAH accuracy)")
    return np.asarray(self._greedy(self.params, state, last_BV, int(num_new)))


def _batches(items: Sequence, batch_size: int):
  """Fixed-size batches (the last one padded by repeating its final item) and each one's real size,
  so every batch compiles to the same shapes."""
  for i in range(0, len(items), batch_size):
    chunk = list(items[i:i + batch_size])
    n = len(chunk)
    yield chunk + [chunk[-1]] * (batch_size - n), n


def _check_vocab(runner: StreamingRunner, tokenizer):
  if tokenizer.vocab_size > runner.vocab_size:
    raise ValueError(f"the model's vocabulary ({runner.vocab_size}) is smaller than the tokenizer's "
                     f"({tokenizer.vocab_size}): it was not trained on text with this tokenizer")


# ---------------------------------------------------------------------------------------------------
# BABILong-style qa1-qa5.


def score_labels(runner: StreamingRunner, prompts: Sequence[np.ndarray],
                 labels: Sequence[np.ndarray]) -> np.ndarray:
  """[B, J] teacher-forced log-likelihood of label j's tokens after prompt b (summed over tokens).

  The prompts are prefilled once; the state is repeated J times so all labels are scored in one call.
  """
  j = len(labels)
  max_len = max(len(p) for p in prompts) + max(len(l) for l in labels)
  streams = [runner.prompt_stream(p) for p in prompts]
  last, state = runner.prefill(streams, max_len=runner.stream_len(max_len))
  logp, _, _ = runner.continuation(repeat_rows(state, j), repeat_rows(last, j),
                                   [l for _ in prompts for l in labels],
                                   prompt_lens=[len(p) for p in prompts for _ in labels])
  return logp.sum(-1).reshape(len(prompts), j)


def evaluate_babilong(runner: StreamingRunner, *, tasks: Sequence[str] = babilong.TASKS,
                      lengths: Sequence[int] = (512, 1024, 2048), num_examples: int = 20,
                      batch_size: int = 8, seed: int = 0, tokenizer=None,
                      log: Callable[[str], None] | None = None) -> dict:
  """BABILong-style accuracy per task and length by restricted argmax over LABELS[task] (our
  variant; module docstring). Examples i < num_examples of split EVAL_SPLIT."""
  tok = tokenizer or ByteTokenizer()
  _check_vocab(runner, tok)
  acc: dict[str, dict[str, float]] = {}
  for task in tasks:
    labels = [tok.encode(l) for l in babilong.LABELS[task]]
    acc[task] = {}
    for length in lengths:
      t0 = time.time()
      exs = [babilong.make_example(task, length, i, seed=seed, tokenizer=tok, split=EVAL_SPLIT)
             for i in range(num_examples)]
      correct = []
      for batch, n in _batches(exs, batch_size):
        prompts = [tok.encode(babilong.prompt_and_answer(e)[0]) for e in batch]
        pred = score_labels(runner, prompts, labels).argmax(-1)[:n]
        correct += [babilong.LABELS[task][p] == e["answer"] for p, e in zip(pred, batch[:n])]
      acc[task][str(length)] = float(np.mean(correct))
      if log:
        log(f"babilong {task} length {length}: accuracy {acc[task][str(length)]:.3f} "
            f"({num_examples} examples, {time.time() - t0:.1f}s)")
  mean = {str(l): float(np.mean([acc[t][str(l)] for t in tasks])) for l in lengths}
  return {"name": f"BABILong-style (memarch generator, procedural noise, {getattr(tok, 'name', 'byte')} "
                  "tokenizer)",
          "metric": "restricted argmax over the task's label set (teacher-forced label "
                    "log-likelihood after '\\nAnswer: ')",
          "tasks": list(tasks), "lengths": [int(l) for l in lengths], "accuracy": acc,
          "mean": mean, "num_examples": int(num_examples), "seed": int(seed),
          "split": EVAL_SPLIT, "segment_len": runner.segment_len}


# ---------------------------------------------------------------------------------------------------
# Passkey and S-NIAH-1.


def _answer_eval(runner, examples, tok, batch_size, greedy: bool):
  """Teacher-forced exact match per example (and greedy string_match_all for NIAH)."""
  exact, smatch = [], []
  for batch, n in _batches(examples, batch_size):
    prompts = [tok.encode(e["prompt"]) for e in batch]
    answers = [tok.encode(e["answer"]) for e in batch]
    a = max(len(x) for x in answers)
    streams = [runner.prompt_stream(p) for p in prompts]
    max_len = runner.stream_len(max(len(p) for p in prompts) + a)
    last, state = runner.prefill(streams, max_len=max_len)
    _, hit, mask = runner.continuation(state, last, answers, prompt_lens=[len(p) for p in prompts])
    exact += list((hit == mask).all(-1)[:n])
    if greedy:
      out = runner.greedy(state, last, a)
      smatch += [string_metrics.string_match_all(tok.decode(o), e["golds"])
                 for o, e in zip(out[:n], batch[:n])]
  return exact, smatch


def evaluate_passkey(runner: StreamingRunner, *, lengths: Sequence[int] = (512, 1024, 2048),
                     depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), num_examples: int = 10,
                     batch_size: int = 8, seed: int = 0, tokenizer=None,
                     log: Callable[[str], None] | None = None) -> dict:
  """Passkey retrieval: teacher-forced exact match of the key's digits per depth x length (`length` is
  the prompt's token budget, as in `needle.make_passkey`)."""
  tok = tokenizer or ByteTokenizer()
  _check_vocab(runner, tok)
  acc: dict[str, dict[str, float]] = {}
  for depth in depths:
    acc[str(depth)] = {}
    for length in lengths:
      exs = [needle.make_passkey(length, depth, i, seed=seed, tokenizer=tok, split=EVAL_SPLIT)
             for i in range(num_examples)]
      exact, _ = _answer_eval(runner, exs, tok, batch_size, greedy=False)
      acc[str(depth)][str(length)] = float(np.mean(exact))
      if log:
        log(f"passkey depth {depth} length {length}: accuracy {acc[str(depth)][str(length)]:.3f}")
  return {"name": "passkey (Mohtashami & Jaggi 2023 format, memarch generator)",
          "metric": "teacher-forced exact match of the pass key's digits",
          "depths": [float(d) for d in depths], "lengths": [int(l) for l in lengths],
          "accuracy": acc, "num_examples": int(num_examples), "seed": int(seed),
          "split": EVAL_SPLIT, "segment_len": runner.segment_len}


def evaluate_niah(runner: StreamingRunner, *, lengths: Sequence[int] = (512, 1024, 2048),
                  depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), num_examples: int = 10,
                  num_needles: int = 1, num_queries: int = 1, batch_size: int = 8, seed: int = 0,
                  tokenizer=None, log: Callable[[str], None] | None = None) -> dict:
  """S-NIAH-1 style (noise haystack, word -> 7-digit number): `accuracy` = teacher-forced exact match
  of the answer, `score` = RULER string_match_all x 100 on greedy decoding, per depth x length."""
  tok = tokenizer or ByteTokenizer()
  _check_vocab(runner, tok)
  acc: dict[str, dict[str, float]] = {}
  score: dict[str, dict[str, float]] = {}
  for depth in depths:
    acc[str(depth)], score[str(depth)] = {}, {}
    for length in lengths:
      exs = [needle.make_niah(length, depth, i, num_needles=num_needles, num_queries=num_queries,
                              seed=seed, tokenizer=tok, split=EVAL_SPLIT)
             for i in range(num_examples)]
      exact, sm = _answer_eval(runner, exs, tok, batch_size, greedy=True)
      acc[str(depth)][str(length)] = float(np.mean(exact))
      score[str(depth)][str(length)] = 100.0 * float(np.mean(sm))
      if log:
        log(f"niah depth {depth} length {length}: accuracy {acc[str(depth)][str(length)]:.3f}, "
            f"string_match_all {score[str(depth)][str(length)]:.1f}")
  return {"name": "S-NIAH-1 style (noise haystack, memarch generator)"
                  + (f", {num_needles} needles, {num_queries} queried" if num_needles > 1 else ""),
          "metric": "accuracy: teacher-forced exact match; score: string_match_all x 100 on greedy "
                    "decoding",
          "depths": [float(d) for d in depths], "lengths": [int(l) for l in lengths],
          "accuracy": acc, "score": score, "num_examples": int(num_examples), "seed": int(seed),
          "split": EVAL_SPLIT, "segment_len": runner.segment_len}
