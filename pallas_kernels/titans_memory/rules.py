"""The pluggable pieces of the memory engine: attentional bias, retention, learning algorithm.

Miras (Behrouz et al., "It's All Connected", arXiv 2504.13173 §3-4, Table 1) describes a memory as
four choices; the engine (`reference.memory_reference`, `xla.memory_xla`) fixes the structure (the
Titans MLP memory M_W, or the linear W x at depth 1) and takes the other three from a `MemoryRule`:

- Attentional bias (`bias`): the inner loss of one token, given as its gradient g w.r.t. the memory
  output (the engine backpropagates g through M_W), with e = M_W(k) - v and
  sabs(x) = sqrt(x^2 + 1e-6), ssign(x) = x / sabs(x) [ours; docs/architectures/miras.md]:
    "l2":    g = e                                   (1/2 ||e||^2: Titans, Memora)
    "lp":    g = ssign(e) sabs(e)^(p-1)              (||e||_p^p / p: Moneta, Eq. 24; the 1/p makes
             p = 2 the l2 bias above, so one theta calibration serves both; Eq. 24's gradient
             p ssign(e)|e|^(p-1) would step 3x larger at p = 3)
    "huber": g = e if rms(e) <= delta else delta ssign(e)   (Yaad, Eq. 26; delta gets no gradient
             through the mask, only through the second branch). delta is a per-entry threshold
             (the channel-wise clip of Eq. 14), so the test compares the RMS error with it,
             ||e||_2 <= sqrt(D) delta: both branches then have RMS delta at the threshold. (Eq. 26
             compares ||e||_2 with delta itself, where the sign branch is sqrt(D) times larger
             than the l2 branch at the threshold and, with per-entry errors of order 1, every
             write at D = 32 is sign-only.)
    "dot":   g = -v                                  (-<M(k), v>, Miras §3's linear-attention bias;
             keys only enter through the backprop [ours])
- Retention (`retention`): which state X the engine carries and how it maps to the weights,
  W = phi(X); the state recurrence itself is always the linear X_t = a_t X_{t-1} + (update):
    "l2": phi(W) = W                                 (weight decay a_t: Titans, Yaad)
    "lq": phi_q(A) = ssign(A) sabs(A)^(q-1) / (mean sabs(A)^q)^((q-2)/q) per weight matrix: the
          rescaled mirror map [ours; docs/architectures/miras.md] (degree 1; phi_2(A) = A). The
          printed A / ||A||_q^(q-2) (degree 3 - q, which makes retention amplify W at q = 4) is
          not implemented. (Moneta)
    "kl": phi(Z) = c softmax_row(Z) over each row's fan-in, c per (head, memory layer) (Memora,
          Eq. 21, 27: Softmax(a log W - theta grad) up to row constants).
- Learning algorithm (`momentum`): with momentum (Titans, v1 Eq. 13-14) S_t = eta_t S_{t-1} -
  theta_t u_t and X_t = a_t X_{t-1} + S_t; without (all of Miras) X_t = a_t X_{t-1} - theta_t u_t.
  `lag_token` (Memora): the first token of every chunk takes its own exact step.
- Where phi is applied (Miras §5.4: the non-linearities only at chunk ends). Within a chunk the
  reads see the linearised weights W_t = X_t + P_t (phi(X_base) - X_base), P_t the retention product
  since the base: the chunk's updates applied to the weights phi(X_base) directly, i.e.
  W_t = beta_t phi(X_base) - sum_i G[t, i] g_i r_i^T, which the chunked form reads in the dual form
  like an identity-phi memory. A token that ends a chunk reads phi(X_t) (so chunk size 1 is the
  exact per-token recurrence). `exact_read=True` reads phi(X_t) at every token instead (per-token
  weights in the chunked form: |W| per token, ~10x the time and memory; a check, not a default).

The update u_t^(l) = g_t^(l) r_t^(l)^T of memory layer l is the gradient of the bias at
W_base = phi(X_base), X_base the state at the chunk start (the frozen-base rule of Titans v1 §3.2
and Miras §5.4).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

EPS = 1e-6
BIASES = ("l2", "lp", "huber", "dot")
RETENTIONS = ("l2", "lq", "kl")


def sabs(x):
  return jnp.sqrt(x * x + EPS)


def ssign(x):
  return x / sabs(x)


@dataclasses.dataclass(frozen=True)
class MemoryRule:
  """One memory's choice of pieces (static, hashable). The default is Titans."""
  bias: str = "l2"
  p: float = 3.0
  retention: str = "l2"
  q_norm: float = 4.0
  momentum: bool = True
  lag_token: bool = False
  exact_read: bool = False

  def __post_init__(self):
    if self.bias not in BIASES:
      raise ValueError(f"unknown bias {self.bias!r}; choose one of {BIASES}")
    if self.retention not in RETENTIONS:
      raise ValueError(f"unknown retention {self.retention!r}; choose one of {RETENTIONS}")

  @property
  def weights_are_state(self) -> bool:
    """phi is the identity: the chunked read can use the dual form (no per-token weights)."""
    return self.retention == "l2"

  @property
  def reads_linearised(self) -> bool:
    """phi is not the identity and is applied at chunk ends only (the default; module docstring)."""
    return not self.weights_are_state and not self.exact_read

  def read_weights(self, x, base, since_base, c_L=None, phi_base=None):
    """The weights a read of the state sees: phi(X) when the rule reads exactly (or phi is the
    identity); otherwise the linearised J(X) + since_base (phi(base) - J(base)), J = `read_map`
    at the base, which is phi(X) right after a chunk end (base = X, since_base = 1). since_base
    [...] broadcasts over [..., out, in]; phi_base: phi(base) when the caller already has it."""
    if not self.reads_linearised:
      return self.phi(x, c_L)
    pb = jnp.asarray(since_base)[..., None, None]
    phi_base = self.phi(base, c_L) if phi_base is None else phi_base
    J = self.read_map(base, c_L, phi_base)
    return tuple(J[l](x_) + pb * (p_ - J[l](b_))
                 for l, (x_, p_, b_) in enumerate(zip(x, phi_base, base)))

  def read_map(self, base, c_L=None, phi_base=None, factored=None):
    """Per memory layer, the linear map J that carries a change of the state into a change of the
    weights in the linearised read, applied to rows over the layer's fan-in ([..., m, in]: weight
    matrices or the rank-1 factors r_i of the chunk's updates, so the dual form is kept).

    phi's Jacobian at the base would be exact, but for "kl" it mixes each row with its own softmax
    s_j, which breaks the rank-1 updates; we use the Jacobian of c softmax at rows all equal to the
    mean row s = mean_j softmax(Z_base)_j, J(r) = c (s * r - <s, r> s), exact when the rows
    agree (e.g. uniform rows at init) [ours; docs/architectures/miras.md]. Without it a logit
    step lands on the weights phi(Z) (entries ~ c / fan-in) as if it were a weight step, ~100x
    too strong within a chunk. For "lq" phi_q's Jacobian is diagonal up to its normaliser's term;
    we use its mean diagonal, kappa = mean(d num / dA) / norm (a scalar per layer: rank-1 kept;
    kappa = 3 E[A^2] / sqrt(E[A^4]) ~ 1.7 for Gaussian A at q = 4). The identity for "l2".
    phi_base: phi(base) when the caller has it ("kl" reads its mean row from it); factored:
    phi(base) as `phi_factored` gives it, instead ("kl" reads the mean of its row softmaxes)."""
    if factored is not None and self.retention != "kl":
      phi_base = factored[0]                                 # no scales outside "kl"
    if self.retention == "l2":
      return tuple(lambda r: r for _ in base)
    if self.retention == "lq":
      q = self.q_norm

      def power(x, e):  # integer exponents as products (cheap; as in phi)
        return x ** int(e) if float(e).is_integer() else x ** e

      def lq_map(b_):
        x2 = b_ * b_ + EPS
        slope = ((q - 1.0) * b_ * b_ + EPS)                              # d num / dA, elementwise
        if q != 4.0:
          slope = slope * power(x2, (q - 4.0) / 2.0)
        norm = jnp.mean(power(x2, q / 2.0), axis=(-2, -1), keepdims=True) ** ((q - 2.0) / q)
        kappa = jnp.mean(slope, axis=(-2, -1), keepdims=True) / norm
        return lambda r: kappa * r

      return tuple(lq_map(b_) for b_ in base)

    def kl_map(l, b_):
      c = c_L[..., l, None, None]
      if factored is not None:
        mean_row = factored[0][l].mean(axis=-2, keepdims=True)           # [..., 1, in]
      elif phi_base is not None:
        mean_row = phi_base[l].mean(axis=-2, keepdims=True) / c
      else:
        mean_row = jax.nn.softmax(b_, axis=-1).mean(axis=-2, keepdims=True)
      return lambda r: c * (mean_row * r - (r * mean_row).sum(-1, keepdims=True) * mean_row)

    return tuple(kl_map(l, b_) for l, b_ in enumerate(base))

  def output_grad(self, e, v, delta):
    """g for rows e = M(k) - v and v [..., D]; delta [...] (Huber only, None otherwise)."""
    if self.bias == "l2":
      return e
    if self.bias == "lp":
      return ssign(e) * sabs(e) ** (self.p - 1.0)
    if self.bias == "huber":
      en = lax.stop_gradient(e)
      inside = jnp.sqrt(jnp.mean(en * en, axis=-1, keepdims=True)) <= delta[..., None]
      return jnp.where(inside, e, delta[..., None] * ssign(e))
    return -v + 0.0 * e  # "dot"

  def phi_factored(self, xs, c_L=None):
    """phi(xs) as (mats, scales) with W_l = scales[l] * mats[l]: for "kl" the row softmaxes and
    c, so a reader can apply c after its matmul and no weight-sized c * softmax is formed (nor
    kept for the backward); otherwise (phi(xs), None per layer). Reverse mode only for "kl"
    (`softmax_rows`); `phi` itself is plain autodiff (the probes take its forward derivative)."""
    if self.retention != "kl":
      return self.phi(xs, c_L), (None,) * len(xs)
    return (tuple(softmax_rows(x) for x in xs),
            tuple(c_L[..., l, None, None] for l in range(len(xs))))

  def phi(self, xs, c_L=None):
    """Memory weights from the state: tuple of [..., out, in]; c_L [..., L] (the "kl" scale c)."""
    if self.retention == "l2":
      return tuple(xs)
    if self.retention == "lq":
      # ssign(x) sabs(x)^(q-1) = x (x^2 + eps)^((q-2)/2) and sabs(x)^q = (x^2 + eps)^(q/2): the same
      # values without the square root, and polynomial (integer powers) for even q (q = 4: x (x^2 +
      # eps)), which is several times cheaper than pow/sqrt on every weight of every chunk.
      q, out = self.q_norm, []
      for x in xs:
        x2 = x * x + EPS
        half = (q - 2.0) / 2.0
        num = x * (x2 ** int(half) if half == int(half) else x2 ** half)
        mq = jnp.mean(x2 ** (int(q) // 2) if q % 2 == 0 else x2 ** (q / 2.0), axis=(-2, -1),
                      keepdims=True)
        out.append(num / mq ** ((q - 2.0) / q))
      return tuple(out)
    return tuple(c_L[..., l, None, None] * jax.nn.softmax(x, axis=-1) for l, x in enumerate(xs))


@jax.custom_vjp
def softmax_rows(z):
  """softmax over the last axis whose backward keeps only its output s: dz = s (ds - <s, ds>)
  (autodiff through jax.nn.softmax kept the exponentials as well, a second weight-sized array
  per call in Memora's chunk; docs/results.md). Reverse mode only."""
  return jax.nn.softmax(z, axis=-1)


def _softmax_rows_fwd(z):
  s = jax.nn.softmax(z, axis=-1)
  return s, s


def _softmax_rows_bwd(s, ds):
  return (s * (ds - jnp.sum(s * ds, axis=-1, keepdims=True)),)


softmax_rows.defvjp(_softmax_rows_fwd, _softmax_rows_bwd)


TITANS = MemoryRule()
