"""Model FLOPs per token of every family, device peaks and MFU (docs/recipes.md, "Throughput").

One place for the arithmetic that the training loop (train/mfu), the dry run (scripts/train.py
--dry_run) and the benchmark (scripts/bench.py) share. Conventions:

- A multiply-add is 2 FLOPs. A training step costs 3x the forward (the backward computes the
  gradients of the activations and of the weights, each about one forward), so the dense part is
  the familiar 6N per token (Kaplan et al. 2020, arXiv 2001.08361, §2.1); rematerialisation's
  extra forward is not counted (model FLOPs, not hardware FLOPs; Chowdhery et al. 2022, PaLM,
  arXiv 2204.02311, §4.1 "Training Efficiency", where MFU is defined).
- Dense part: 2 x the matmul weights a token passes through: every parameter of two or more axes
  in the blocks, except tables a token only indexes (the embedding, PEER and UltraMem value tables,
  where only the read rows count), learned initial memories (Titans/Miras W_0) and persistent
  tokens; plus the output head, d_model x vocab, tied or not. Norm scales, biases and elementwise
  work are not counted. Mixture layers count active parameters only: MoM's routed projections at
  top_k / num_memories (our implementation runs every memory's projections, so it executes more;
  docs/architectures/mom.md), PEER and UltraMem their retrieved experts.
- Sequence mixing, per token and layer (forward):
  * softmax attention: 2 x 2 x d x ctx (scores q k^T and the weighted sum of v), ctx = the mean
    number of keys a query sees. Causal attention counts the causal half: ctx = (T + 1) / 2 for
    full attention, the mean of min(t + 1, window) for a window, plus any prefix every query sees
    (Titans' persistent tokens). Our XLA attention computes the masked T x T product in full, so
    its executed FLOPs are higher (`causal=False` gives that count).
  * gated delta rule / linear attention (Gated DeltaNet, MoM): per head the chunked form's matmuls,
    6 K V + 2 C (3 K + 2 V), resp. 4 K V + 2 C (K + V) (`recurrence_flops_per_token`).
  * Titans / Miras memory MLP with P weights per head: the read (2 P) plus the write, one forward
    and backward of the inner loss at the chunk's weights (6 P): 8 P per token and head; the
    per-chunk weight updates (O(P / C) per token) are not counted [ours].
  * landmark attention and HCAM: the local window plus the retrieved blocks or chunks, and one
    score per block or chunk summary [ours, approximate].
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

from memarch import registry

# Dense (no sparsity) bf16 peak FLOP/s and HBM bytes/s of one device, from the vendors' datasheets:
# NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOP/s bf16 dense, 3.35 TB/s); NVIDIA H200
# datasheet (same bf16 tensor cores, 4.8 TB/s); Google Cloud TPU v5p documentation (459 TFLOP/s
# bf16, 2,765 GB/s). docs/recipes.md lists them with the sources.
DEVICE_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "TPU v5p": (459e12, 2.765e12)}

# Parameters the dense count skips: a token indexes them (tables), or they are per-sequence
# constants (learned initial memories W_0, persistent tokens), or elementwise (scales, biases).
_SKIP_NAMES = ("embed", "persistent", "w0", "sub_keys", "down", "up", "values", "pre_values")
_ELEMENTWISE = ("scale", "bias", "A_log", "cores")


class FlopsPerToken(NamedTuple):
  """Model FLOPs per token. dense: 2 x matmul weights (head included); sequence: attention or
  recurrence; forward = dense + sequence; train = 3 x forward."""
  dense: float
  sequence: float
  forward: float
  train: float
  per_layer: tuple[tuple[str, float, float], ...]  # (mixer/channel, dense, sequence) forward


def recurrence_flops_per_token(op: str, dk: int, dv: int, chunk: int) -> int:
  """Forward FLOPs per token and head of one chunked gated-delta-rule or linear-attention call,
  from the chunk form's matmuls (docs/architectures/gated_deltanet.md): gated delta rule
  6 K V + 2 C (3 K + 2 V) (W S, Q S, K~^T V'; K K^T, T X_w, Q K^T; T X_u, P V'), linear attention
  4 K V + 2 C (K + V). The (I + A)^-1 solve is not counted."""
  if op == "gated_delta_rule":
    return 6 * dk * dv + 2 * chunk * (3 * dk + 2 * dv)
  return 4 * dk * dv + 2 * chunk * (dk + dv)


def causal_context(seq_len: int, window: int | None = None, *, causal: bool = True) -> float:
  """Mean number of keys a query attends to in a row of `seq_len` (`window`: at most that many)."""
  t = seq_len
  if not causal:
    return float(min(t, window) if window else t)
  w = min(window or t, t)
  # positions 0..w-1 see t+1 keys, the rest see w
  return (w * (w + 1) / 2 + (t - w) * w) / t


def _attention_flops(d_attn: int, ctx: float) -> float:
  return 4.0 * d_attn * ctx


def _memory_mlp_params(head_dim: int, expansion: int, depth: int) -> int:
  from layers.titans import memory_shapes
  return sum(o * i for o, i in memory_shapes(head_dim, expansion, depth))


def _leaves(tree) -> list[tuple[str, Any]]:
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    out.append((".".join(n for n in names if n not in ("value", "")), leaf))
  return out


def _dense_params(path: str, shape, *, mom_active: float = 1.0) -> float:
  """The matmul weights of one parameter a token passes through (0 for skipped ones)."""
  last = path.rsplit(".", 1)[-1]
  parts = path.split(".")
  if len(shape) < 2 or any(p in _SKIP_NAMES or p.startswith("w0") for p in parts):
    return 0.0
  if any(last.endswith(e) or last == e for e in _ELEMENTWISE):
    return 0.0
  size = 1
  for s in shape:
    size *= s
  if last in ("wk", "wv", "wa", "wb") and len(shape) == 3 and mom_active != 1.0:
    return size * mom_active  # MoM's per-memory projections [M, d, .]: active ones only
  return float(size)


def _mixer_config(lm_cfg, name: str):
  kwargs = dict(lm_cfg.mixer_kwargs.get(name, {}))
  return registry.make_config(registry.SEQUENCE_MIXERS, "sequence mixer", name,
                              d_model=lm_cfg.d_model, num_heads=lm_cfg.num_heads, **kwargs)


def _channel_config(lm_cfg, name: str):
  kwargs = dict(lm_cfg.channel_kwargs.get(name, {}))
  return registry.make_config(registry.CHANNEL_MIXERS, "channel mixer", name,
                              d_model=lm_cfg.d_model, **kwargs)


def mixer_sequence_flops(name: str, cfg, seq_len: int, *, causal: bool = True) -> float:
  """Forward sequence-mixing FLOPs per token of one layer of mixer `name` (config `cfg`), plus the
  dense work a parameter count misses (MAC runs its attention's key and value projections twice)."""
  d = cfg.d_model
  t = seq_len
  if name in ("attention", "swa"):
    return _attention_flops(d, causal_context(t, cfg.window, causal=causal))
  if name == "gated_deltanet":
    return cfg.num_heads * recurrence_flops_per_token("gated_delta_rule", cfg.dk, cfg.dk,
                                                      cfg.chunk_size)
  if name == "mom":
    active = cfg.top_k + int(cfg.shared_memory)
    return active * cfg.num_heads * recurrence_flops_per_token("gated_delta_rule", cfg.dk, cfg.dk,
                                                               cfg.chunk_size)
  if name in ("titans_lmm", "titans_mag", "titans_mal", "titans_mac", "moneta", "yaad", "memora"):
    h, dh = cfg.num_heads, d // cfg.num_heads
    mem = h * 8 * _memory_mlp_params(dh, cfg.expansion, cfg.memory_depth)
    n_p = cfg.num_persistent
    if name in ("titans_mag", "titans_mal"):
      return mem + _attention_flops(d, causal_context(t, cfg.window, causal=causal) + n_p)
    if name == "titans_mac":
      c = min(cfg.segment_len, t)
      # per segment: [P; h; x_seg] with h and x causal; the read-only retrieval (2 P per head);
      # the attention's k, v projections of the retrieved h (4 d^2)
      ctx = n_p + 2 * causal_context(c, causal=causal)
      read = h * 2 * _memory_mlp_params(dh, cfg.expansion, cfg.memory_depth)
      return mem + read + _attention_flops(d, ctx) + 4.0 * d * d
    return mem
  if name == "landmark":
    b = cfg.block_size
    k = cfg.top_k if cfg.top_k is not None else t // b
    ctx = min(causal_context(t, causal=causal), (cfg.recent_blocks + 1) * b + k * b)
    return _attention_flops(d, ctx) + 2.0 * d * causal_context(t, causal=causal) / b
  if name == "hcam":
    c, s = cfg.chunk_size, cfg.segment_len
    chunks = min(cfg.max_chunks, max(t // c, 1))
    k = cfg.top_k if cfg.top_k is not None else chunks
    gate = cfg.gate_dim or d // cfg.num_heads
    local = causal_context(min(s, t), causal=causal)
    return _attention_flops(d, local + k * c) + 2.0 * gate * chunks / 2
  raise ValueError(f"memarch.flops: no FLOPs formula for sequence mixer {name!r}; add one")


def channel_extra_flops(name: str, cfg) -> float:
  """Forward FLOPs per token of a channel mixer beyond its dense weights: PEER's key scores and
  retrieved experts, UltraMem's memory layer (layers.ultramem.memory_flops_per_token)."""
  if name == "peer":
    return 2.0 * cfg.num_heads * cfg.num_subkeys * cfg.dk + 4.0 * cfg.d_model * cfg.num_heads * cfg.top_k
  if name == "ultramem":
    from layers.ultramem import memory_flops_per_token
    return float(memory_flops_per_token(cfg))
  return 0.0


def flops_per_token(lm_cfg, params, seq_len: int, *, causal: bool = True) -> FlopsPerToken:
  """Model FLOPs per token of the LM `lm_cfg` with parameters `params` (nnx.state(model, nnx.Param)
  of the real or the abstract model: only shapes are read) on rows of `seq_len` tokens."""
  by_block: dict[int, list[tuple[str, Any]]] = {}
  for path, leaf in _leaves(params):
    if path.startswith("blocks."):
      i = int(path.split(".")[1])
      by_block.setdefault(i, []).append((path.split(".", 2)[2], leaf))
  per_layer = []
  dense = 2.0 * lm_cfg.d_model * lm_cfg.vocab_size  # the output head
  sequence = 0.0
  for i in range(lm_cfg.num_layers):
    mname, cname = lm_cfg.mixer_name(i), lm_cfg.channel_name(i)
    mcfg = _mixer_config(lm_cfg, mname)
    mom_active = mcfg.top_k / mcfg.num_memories if mname == "mom" else 1.0
    d_i = 0.0
    for path, leaf in by_block.get(i, []):
      if path.startswith("channel.") and cname == "ultramem" and not path.startswith("channel.ffn."):
        continue  # the memory layer is counted by its own formula
      d_i += 2.0 * _dense_params(path, leaf.shape, mom_active=mom_active)
    s_i = mixer_sequence_flops(mname, mcfg, seq_len, causal=causal)
    if cname != "none":
      s_i += channel_extra_flops(cname, _channel_config(lm_cfg, cname))
    per_layer.append((f"{mname}/{cname}", d_i, s_i))
    dense += d_i
    sequence += s_i
  forward = dense + sequence
  return FlopsPerToken(dense, sequence, forward, 3.0 * forward, tuple(per_layer))


def device_peak(device_kind: str) -> tuple[float, float] | None:
  """(bf16 FLOP/s, HBM bytes/s) of a device kind ('NVIDIA H100 80GB HBM3', 'TPU v5p'), or None."""
  return next((p for name, p in DEVICE_PEAKS.items() if name.lower() in device_kind.lower()), None)


def mfu(flops_per_token_: float, tokens_per_sec: float, peak_flops: float, num_devices: int) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (peak_flops per device)."""
  return flops_per_token_ * tokens_per_sec / (peak_flops * max(num_devices, 1))


def describe(f: FlopsPerToken) -> str:
  return (f"{f.train / 1e9:.3f} GFLOP/token training (3 x forward {f.forward / 1e9:.3f}: dense "
          f"{f.dense / 1e9:.3f}, sequence mixing {f.sequence / 1e9:.3f})")
