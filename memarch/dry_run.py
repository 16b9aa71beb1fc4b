"""`scripts/train.py --dry_run`: what a config will cost, without training or compiling a step
(docs/recipes.md, "Dry run").

The model and optimizer are built abstractly (`nnx.eval_shape`: shapes and dtypes, no arrays), so
the parameter count is the real model's, exact and cheap even at 1.3b on a CPU. From it: tokens per
optimizer step, model FLOPs per token (memarch.flops) and a memory estimate per device.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from memarch import configs_lib, flops, sharding

MIXERS_WITH_SCORES = ("attention", "swa", "titans_mag", "titans_mal", "landmark", "hcam")
MEMORY_MIXERS = ("titans_lmm", "titans_mag", "titans_mal", "titans_mac", "moneta", "yaad", "memora")


class Memory(NamedTuple):
  """Bytes per device: the training state (exact dtypes; sharded over fsdp x tensor) and a rough
  estimate of one micro-batch's activations."""
  params: float
  optimizer: float
  grads: float  # the float32 gradient accumulator of train_step
  state_per_device: float
  activations_per_device: float


class DryRun(NamedTuple):
  params_total: int
  params_embedding: int  # input embedding (+ the untied head)
  params_non_embedding: int
  vocab_size: int
  tokens_per_step: int
  tokens_per_micro_batch: int
  flops: flops.FlopsPerToken
  memory: Memory
  shards: int  # mesh.fsdp x mesh.tensor


def vocab_size(config) -> int:
  """The model's vocabulary without reading the data: model.vocab_size, else the data's (a BPE's
  data.vocab_size is its upper bound; a tokenizer file is read, never trained)."""
  if config.model.vocab_size:
    return int(config.model.vocab_size)
  d = config.data
  if d.name in ("mqar", "memorization"):
    return int(d.vocab_size)
  if d.get("tokenizer", "byte") == "bpe":
    return int(d.vocab_size)
  from memarch.data.tokenizer import get_tokenizer
  return int(get_tokenizer(d.tokenizer, d.spm_model or None).vocab_size)


def abstract_state(config, vocab: int):
  """(lm_cfg, abstract model Params, abstract optimizer state) built with nnx.eval_shape."""
  from memarch.lm import LM
  from memarch.optim import make_optimizer
  lm_cfg = configs_lib.lm_config(config, vocab)
  opt_cfg = configs_lib.opt_config(config)

  def build():
    model = LM(lm_cfg, rngs=nnx.Rngs(config.seed))
    opt = nnx.Optimizer(model, make_optimizer(opt_cfg, config.train.num_steps, model),
                        wrt=nnx.Param)
    return model, opt

  with sharding.mesh_context(sharding.single_device_mesh()):
    model, opt = nnx.eval_shape(build)
  return lm_cfg, nnx.state(model, nnx.Param), nnx.state(opt)


def _nbytes(tree) -> float:
  return float(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def activation_bytes(config, lm_cfg, rows: float, f: flops.FlopsPerToken) -> float:
  """A rough estimate (within ~2x) of one micro-batch's stored activations on one device.

  A block without remat stores Korthikanti et al. 2022's 34 d bytes per token (arXiv 2205.05198,
  §4.1, Eq. 1, at 16-bit activations; scaled here by the compute dtype), plus the float32 T x T
  attention scores our XLA attention materialises (logits and probabilities: 8 + itemsize bytes
  each) and the Titans/Miras memory's chunk-boundary weights and momentum (float32). remat=dots
  keeps the outputs of the block's projections (its dense weights / d_model values per token)
  plus one block's full working set while it is recomputed; remat=full keeps each block's input
  plus that working set. The float32 logits and their gradient come on top."""
  t, d, layers = config.data.seq_len, lm_cfg.d_model, lm_cfg.num_layers
  itemsize = np.dtype(lm_cfg.dtype).itemsize
  tokens = rows * t
  full, kept = [], []
  for i in range(layers):
    name = lm_cfg.mixer_name(i)
    b = 34 * d * itemsize / 2 * tokens
    if name in MIXERS_WITH_SCORES:
      b += rows * lm_cfg.num_heads * t * t * (8 + itemsize)
    if name in MEMORY_MIXERS:
      kw = lm_cfg.mixer_kwargs.get(name, {})
      dh = d // lm_cfg.num_heads
      p = flops._memory_mlp_params(dh, kw.get("expansion", 4), kw.get("memory_depth", 2))
      b += rows * (t / kw.get("chunk_size", 16)) * lm_cfg.num_heads * p * 4 * 2
    full.append(b)
    kept.append(f.per_layer[i][1] / 2 / d * itemsize * tokens)  # dense FLOPs / 2 = weights
  if lm_cfg.remat == "full":
    blocks = layers * tokens * d * itemsize + max(full)
  elif lm_cfg.remat == "dots":
    blocks = sum(kept) + max(full)
  else:
    blocks = sum(full)
  logits = tokens * lm_cfg.vocab_size * 4 * 2
  return blocks + logits


def plan(config) -> DryRun:
  """Everything `--dry_run` prints, from the config alone (no data read, nothing compiled)."""
  configs_lib.validate(config)
  vocab = vocab_size(config)
  lm_cfg, params, opt_state = abstract_state(config, vocab)
  total = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
  embedding = lm_cfg.vocab_size * lm_cfg.d_model * (1 if lm_cfg.tie_embeddings else 2)
  d = config.data
  tokens_per_step = d.batch_size * d.seq_len
  accum = config.opt.grad_accum
  m = config.mesh
  shards = max(m.fsdp, 1) * max(m.tensor, 1)
  batch_ways = (m.data if m.data > 0 else 1) * max(m.fsdp, 1)  # batch axis: data x fsdp
  rows = d.batch_size / accum / batch_ways
  p_bytes = _nbytes(params)
  opt_bytes = _nbytes(opt_state)  # Adam's moments (and a step count), at their own dtypes
  g_bytes = 4.0 * total
  state = (p_bytes + opt_bytes + g_bytes) / shards
  f = flops.flops_per_token(lm_cfg, params, d.seq_len)
  mem = Memory(p_bytes, opt_bytes, g_bytes, state, activation_bytes(config, lm_cfg, rows, f))
  return DryRun(total, embedding, total - embedding, lm_cfg.vocab_size, tokens_per_step,
                int(d.batch_size // accum * d.seq_len), f, mem, shards)


def _gib(b: float) -> str:
  return f"{b / 2**30:.2f} GiB"


def report(r: DryRun, config) -> str:
  """The lines --dry_run prints."""
  f, m = r.flops, r.memory
  steps = config.train.num_steps
  lines = [
      f"parameters: {r.params_total:,} total = {r.params_embedding:,} embedding "
      f"(vocab {r.vocab_size:,} x d_model {config.model.d_model}"
      f"{', tied head' if config.model.tie_embeddings else ', + untied head'}) + "
      f"{r.params_non_embedding:,} non-embedding",
      f"tokens per optimizer step: {r.tokens_per_step:,} ({config.data.batch_size} rows x "
      f"{config.data.seq_len} tokens, {config.opt.grad_accum} micro-batches of "
      f"{r.tokens_per_micro_batch:,}); {steps:,} steps = {steps * r.tokens_per_step / 1e9:.2f}B "
      "tokens",
      f"model FLOPs per token: {flops.describe(f)}; 6N = "
      f"{6 * r.params_non_embedding / 1e9:.3f} GFLOP (non-embedding N); "
      f"{f.train * r.tokens_per_step * steps:.3g} FLOPs for the run",
      f"memory per device, state (exact dtypes, / fsdp x tensor = {r.shards}): "
      f"{_gib(m.state_per_device)} = (params {_gib(m.params)} + optimizer {_gib(m.optimizer)} + "
      f"float32 gradients {_gib(m.grads)}) / {r.shards}",
      f"memory per device, activations of one micro-batch (ROUGH, within ~2x; model.remat="
      f"{config.model.remat}, model.dtype={config.model.dtype}): {_gib(m.activations_per_device)}",
  ]
  return "\n".join(lines)
