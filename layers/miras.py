"""Miras: Moneta, Yaad and Memora (Behrouz et al., "It's All Connected", arXiv 2504.13173).

Equations, chunking and the scales we chose: docs/architectures/miras.md (the shared engine:
docs/architectures/titans.md).

`Miras` (registered `moneta`, `yaad`, `memora`) is the Titans memory layer: it subclasses
`layers.titans.NeuralMemory` (projections, causal convs, theta gate, output gate, initial memory,
persistent tokens, state handling) and swaps the memory op for a Miras memory
(`pallas_kernels.miras_memory`, the Titans engine with another attentional bias and retention and no
momentum):

    q, k, v = SiLU(CausalConv_4(x W_{q,k,v}));  q, k <- L2-normalised per head
    theta = theta_max * sigmoid(x W_theta + b_theta)     per token, head and memory layer
    a     = sigmoid(-(x W_alpha + b_alpha))              retention factor (Miras' alpha_t = Titans'
                                                         1 - alpha_t: the same gate), per token, head
    delta = softplus(x W_delta + b_delta)                Huber threshold (Yaad), per token and head
    z = Memory(q, k, v, theta, a, delta)                 plain GD, chunked (gradients at the chunk base)
    o = W_o concat_h(RMSNorm_h(z) * SiLU(x W_g))

    Moneta: l_3 bias (||e||_3^3 / 3), l_4 retention on a dual state A, W = phi_4(A)
                                                                      (Eq. 24-25; rescaled map [ours])
    Yaad:   Huber bias, l2 retention                                  (Eq. 26)
    Memora: l2 bias, KL retention on logits Z, W = c softmax_row(Z)   (Eq. 21, 27), with the
            paper's lag token (the first token of each chunk takes its own exact step)

Choices [ours]: the paper's channel-wise gates from low-rank projections become scalars per
(head, memory layer) for theta and per head for a and delta (the op's interface); b_alpha = -6.9
(a ~ 0.999; -4.6, a ~ 0.99, for the linear memory; as in Titans), b_delta = 1.8546 (delta = 2,
a per-entry threshold on the RMS error), b_theta = logit(theta_init) (0 by default);
theta_max = 0.3 / head_dim for the MLP memory, 1.0 for the linear one, as in Titans. The initial state `w0` (W_0 for Yaad, the dual A_0 for Moneta, the
logits Z_0 for Memora, unit-scale so the initial rows are not uniform) and Memora's scale c (init 1)
are learned per head and memory layer. Titans' momentum gate (W_eta) is dropped: Miras is plain GD.
Persistent tokens (num_persistent > 0) are consumed first, as in Titans: `init_state` runs the memory
over them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers.base import Gain, MemoryInit, const, dense
from layers.titans import NeuralMemory, TitansConfig, memory_shapes
from pallas_kernels._dispatch import check_implementation
from pallas_kernels.miras_memory import MODELS, init_miras_state, miras_memory
from pallas_kernels.titans_memory.engine import MemoryParams
from pallas_kernels.titans_memory.reference import mlp_apply, token_grads
from pallas_kernels.titans_memory.rules import MemoryRule


@dataclasses.dataclass(frozen=True)
class MirasConfig:
  d_model: int
  num_heads: int
  model: str = "moneta"  # moneta | yaad | memora
  memory_depth: int = 2
  expansion: int = 4
  chunk_size: int = 16
  num_persistent: int = 0
  conv_size: int = 4
  implementation: str | None = None  # kernel path of the memory op (None: best available)
  theta_max: float | None = None  # None or 0: as Titans (1.0 linear, 0.3 / head_dim for the MLP)
  p: float = 3.0  # Moneta's l_p attentional bias
  q_norm: float = 4.0  # Moneta's l_q retention
  kl_scale_init: float = 1.0  # Memora's scale c at init (every head and memory layer)
  kl_logit_std: float = 1.0  # Memora's logits Z_0 ~ N(0, std^2) at init
  theta_init: float = 0.5  # theta at init as a fraction of theta_max (0.5: b_theta = 0, as Titans)

  def __post_init__(self):
    object.__setattr__(self, "implementation",
                       check_implementation(self.implementation, "miras"))
    if self.model not in MODELS:
      raise ValueError(f"miras: unknown model {self.model!r}; choose one of {sorted(MODELS)}")
    if self.d_model % self.num_heads:
      raise ValueError(f"miras: d_model={self.d_model} is not divisible by num_heads="
                       f"{self.num_heads}")
    if self.memory_depth < 1 or self.chunk_size < 1 or self.expansion < 1 or self.conv_size < 1:
      raise ValueError("miras: memory_depth, chunk_size, expansion and conv_size must be >= 1")
    if self.num_persistent < 0:
      raise ValueError(f"miras: num_persistent must be >= 0, got {self.num_persistent}")
    if not self.kl_scale_init > 0:
      raise ValueError(f"miras: kl_scale_init must be > 0, got {self.kl_scale_init}")
    if not self.kl_logit_std > 0:
      raise ValueError(f"miras: kl_logit_std must be > 0, got {self.kl_logit_std}")
    self.titans()  # the shared layer's own checks (theta_init)

  def titans(self) -> TitansConfig:
    """The settings of the shared Titans memory layer (MAC's segment length is irrelevant here)."""
    return TitansConfig(self.d_model, self.num_heads, memory_depth=self.memory_depth,
                        expansion=self.expansion, chunk_size=self.chunk_size,
                        theta_max=self.theta_max, theta_init=self.theta_init,
                        num_persistent=self.num_persistent,
                        conv_size=self.conv_size, segment_len=self.chunk_size,
                        implementation=self.implementation)

  @property
  def head_dim(self) -> int:
    return self.titans().head_dim

  @property
  def theta_cap(self) -> float:
    """theta_max: the config's, else Titans' calibrated cap (1.0 linear, 0.3 / head_dim MLP) for
    every retention. `write_gain` shows how far that is from equal write gains through phi; scaling
    the cap by it made Moneta unstable (docs/architectures/miras.md)."""
    return self.titans().theta_cap


def initial_state_init(retention: str, kl_logit_std: float = 1.0):
  """The initializer of the learned initial state X_0 of one memory matrix [..., out, in]:
  - "l2" (Yaad; W = X): N(0, 1/fan_in), as Titans' W_0;
  - "lq" (Moneta; W = phi_q(A)): A_0 = +-1/sqrt(fan_in) with random signs. Every |A| is equal, so
    phi_q's Jacobian (diagonal, slope ~ |A|^(q-2)) is isotropic there and W_0 = A_0: the chunk's
    linearised read (one mean slope) and the chunk-end phi_q(A) agree, and a write moves every
    coordinate of the key alike. From N(0, 1/fan_in), the slope follows |A|^2 entry by entry, and
    Moneta stayed on the MQAR plateau (docs/architectures/miras.md, "Initial states");
  - "kl" (Memora; W = c softmax_row(Z)): logits Z_0 ~ N(0, kl_logit_std^2), so the rows are not
    uniform (uniform rows make every hidden unit identical).
  """
  def init(key, shape, dtype=jnp.float32):
    z = jax.random.normal(key, shape, dtype)
    if retention == "kl":
      return kl_logit_std * z
    return (jnp.sign(z) if retention == "lq" else z) * shape[-1] ** -0.5

  return init


@functools.lru_cache(maxsize=None)
def write_gain(retention: str, q_norm: float, head_dim: int, expansion: int, depth: int,
               num_probes: int = 256, seed: int = 0, linearised: bool = False,
               kl_scale: float = 1.0, kl_logit_std: float = 1.0) -> float:
  """A diagnostic: how far one write moves the memory's chunk-end read along -e, per unit step:
  -<M_{phi(X_0 - u)}(k) - M_{phi(X_0)}(k), e> / ||e||^2 to first order, u the l2 bias' gradient
  at k (all memory layers), e = M(k) - v; the median over random unit keys and SiLU values, with
  X_0 drawn like the layer's initial state (`initial_state_init`).

  kl_scale, kl_logit_std: Memora's c and the spread of its Z_0 ("kl" only).
  `linearised=True`: the read inside a chunk instead, through the linearised weights
  (`MemoryRule.read_weights` at base X_0). A deterministic probe of the initialisation, run
  eagerly.
  """
  with jax.ensure_compile_time_eval():
    rule = MemoryRule(retention=retention, q_norm=q_norm, momentum=False)
    shapes = memory_shapes(head_dim, expansion, depth)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes) + 2)
    x0 = tuple(initial_state_init(retention, kl_logit_std)(kk, sh)
               for kk, sh in zip(keys, shapes))
    k = jax.random.normal(keys[-2], (num_probes, head_dim))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.nn.silu(jax.random.normal(keys[-1], (num_probes, head_dim)))
    ln_s, ln_b = jnp.ones(head_dim), jnp.zeros(head_dim)
    c_L = jnp.full((len(shapes),), kl_scale)

    def gain(k_D, v_D):
      read = lambda x: mlp_apply(rule.phi(x, c_L), ln_s, ln_b, k_D[None])[0]
      read_lin = lambda x: mlp_apply(rule.read_weights(x, x0, 1.0, c_L), ln_s, ln_b, k_D[None])[0]
      e = read(x0) - v_D
      u = token_grads(rule, x0, MemoryParams(ln_s, ln_b, c_L), k_D, v_D, None)
      step = tuple(-u_ for u_ in u)
      _, dm = jax.jvp(read_lin if linearised else read, (x0,), (step,))
      return -jnp.dot(dm, e) / jnp.dot(e, e)

    return float(jnp.median(jax.jit(jax.vmap(gain))(k, v)))


def binding_probe(model: str, theta_mult: float, *, head_dim: int = 32, expansion: int = 4,
                  pairs: int = 4, chunk: int = 16, kl_scale: float = 1.0, trials: int = 256,
                  seed: int = 0) -> dict:
  """A diagnostic of the inner loop alone: write `pairs` random (k, v) pairs (unit keys, SiLU
  values, no retention) into a fresh depth-2 memory at theta = theta_mult * the Titans cap
  (0.3 / head_dim) on every layer, then read each key back, once inside the writes' chunk (the
  linearised read) and once after the chunk has ended (phi(X) exactly).

  Returns {"in_chunk": (acc, rel), "after_end": (acc, rel)}: acc, how often the read is nearest
  (L2) to its own value among the pairs' values; rel, the median ||M(k_i) - v_i|| after the
  writes over the same before them. The initial state is drawn like `write_gain`'s; Memora's
  scale c is `kl_scale`. Runs eagerly (a few seconds).
  """
  if model not in MODELS:
    raise ValueError(f"binding_probe: unknown model {model!r}; choose one of {sorted(MODELS)}")
  bias, ret = MODELS[model]
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  x0 = tuple(initial_state_init(ret)(kk, (1,) + sh)
             for kk, sh in zip(ks, memory_shapes(head_dim, expansion, 2)))
  keys = jax.random.normal(ks[3], (trials, pairs, head_dim))
  keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
  vals = jax.nn.silu(jax.random.normal(ks[4], (trials, pairs, head_dim)))
  T, put = 2 * chunk, lambda x, at: jnp.zeros((trials, 2 * chunk, 1, head_dim)).at[
      :, at:at + pairs, 0].set(x)
  reads = {"in_chunk": pairs, "after_end": chunk}           # where each read block starts
  q = sum(put(keys, at) for at in reads.values())
  theta = jnp.zeros((trials, T, 1, 2)).at[:, :pairs].set(theta_mult * 0.3 / head_dim)
  ones = jnp.ones((trials, T, 1))

  def run(th):
    return miras_memory(q, put(keys, 0), put(vals, 0), th, ones, 2.0 * ones,
                        jnp.ones((1, head_dim)), jnp.zeros((1, head_dim)),
                        state=init_miras_state(x0, trials, ret), bias=bias, retention=ret,
                        kl_scale_HL=jnp.full((1, 2), kl_scale), lag_token=model == "memora",
                        chunk_size=chunk, implementation="xla")[0][:, :, 0]

  y, y0 = run(theta), run(jnp.zeros_like(theta))
  out = {}
  for name, at in reads.items():
    yi, y0i = y[:, at:at + pairs], y0[:, at:at + pairs]
    dist = jnp.linalg.norm(yi[:, :, None] - vals[:, None], axis=-1)   # [trials, read, value]
    acc = float(jnp.mean(jnp.argmin(dist, -1) == jnp.arange(pairs)))
    rel = float(jnp.median(jnp.linalg.norm(yi - vals, axis=-1)
                           / jnp.linalg.norm(y0i - vals, axis=-1)))
    out[name] = (acc, rel)
  return out


class Miras(NeuralMemory):
  """A Miras memory layer (Moneta / Yaad / Memora by `cfg.model`); see the module docstring."""

  def __init__(self, cfg: MirasConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg.titans(), rngs=rngs, persistent=True, output=True)
    self.cfg = cfg
    d, h, L = cfg.d_model, cfg.num_heads, cfg.memory_depth
    self.bias, self.retention = MODELS[cfg.model]
    del self.w_eta, self.b_eta  # plain GD: no momentum gate
    # std 0.16 / sqrt(d) (0.02 at d = 64): delta's logit spread is 0.16 at every width, not 0.55 at
    # d = 768, where tokens fell into the steep sign branch at init (docs/architectures/miras.md).
    self.w_delta = dense(rngs, (d, h), ("embed", None), std=0.16 * d ** -0.5)
    # delta is the per-entry Huber threshold, compared with the RMS error (titans_memory.rules):
    # per-entry errors are ~1.2 at init, so delta = 2 writes typical tokens with the l2 branch
    # and clips the outliers.
    self.b_delta = const(1.8546, (h,), (None,))  # softplus(1.8546) = 2
    if self.retention != "l2":  # the state X_0 is not the weights: drawn where phi behaves
      self.w0 = nnx.List([
          MemoryInit(nnx.with_partitioning(initial_state_init(self.retention, cfg.kl_logit_std),
                                           ("heads", None, None))(rngs.params(), w.shape))
          for w in self.w0])
    self.kl_scale = const(cfg.kl_scale_init, (h, L), ("heads", None), Gain)

  def _fresh_state(self, batch_size: int, dtype=jnp.float32):
    state = super()._fresh_state(batch_size, dtype)
    state["mem"] = init_miras_state(tuple(w[...] for w in self.w0), batch_size, self.retention)
    return state

  def _read_write(self, x_BTD, state, *, lengths_B=None, aligned: bool = False, segments=None):
    """(z_BTHD, new_state, stats) on one row layout; `NeuralMemory.read_write` spreads packed
    documents over slots first (`segments`)."""
    cfg = self.cfg
    seg = None if segments is None else segments.segment_ids_BS
    reset = None if segments is None else self.reset_state(x_BTD.shape[0])
    q, k, v, theta, x32, convs = self.project(x_BTD, state, lengths_B, seg, reset)
    a = jax.nn.sigmoid(-(x32 @ self.w_alpha[...] + self.b_alpha[...]))
    delta = jax.nn.softplus(x32 @ self.w_delta[...] + self.b_delta[...])
    z, mem = miras_memory(q, k, v, theta, a, delta, self.ln_scale[...], self.ln_bias[...],
                          state=state["mem"], bias=self.bias, p=cfg.p, retention=self.retention,
                          q_norm=cfg.q_norm, kl_scale_HL=self.kl_scale[...],
                          lag_token=cfg.model == "memora", chunk_size=cfg.chunk_size,
                          lengths=lengths_B, assume_aligned=aligned,
                          implementation=cfg.implementation,
                          resets_BT=None if segments is None else segments.starts_BS,
                          reset_state=None if reset is None else reset["mem"])
    stats = {"theta_mean": jnp.mean(theta), "retention_mean": jnp.mean(a),
             "delta_mean": jnp.mean(delta)}
    return z, {"mem": mem, **convs}, stats

  def __call__(self, x_BTD, *, state=None, segment_ids_BT=None):
    return super().__call__(x_BTD, state=state, segment_ids_BT=segment_ids_BT)
