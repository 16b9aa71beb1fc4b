"""Token-by-token oracle for the Miras memories (Behrouz et al., "It's All Connected", arXiv 2504.13173).

Moneta (Eq. 24-25), Yaad (Eq. 26) and Memora (Eq. 21, 27) share the Titans MLP memory
M_W(x) = x + LN(W_2 gelu(W_1 x)) (`pallas_kernels.titans_memory.reference.mlp_apply`), plain GD without
momentum and decoupled step size theta / retention factor a (reference/titans_miras.md §7).
Per token, head and memory layer l, with the frozen-base rule of §7.3:

    e_t = M_{W_base}(k_t) - v_t,       W_base = phi(X_base)   (X_base: the state at the chunk start)
    g_t = attentional-bias output gradient of e_t (below);   u_t = backprop of g_t through M at W_base
    X_t = a_t X_{t-1} - theta_t^(l) u_t^(l)                  (the state X: W, the dual A, or logits Z)
    y_t = M_{phi(X_t)}(q_t)                                   (read after write, exact per-token phi)

Attentional bias (`bias`), with sabs(x) = sqrt(x^2 + 1e-6), ssign(x) = x / sabs(x) (§7.1 [ours]):
  "l2":    g = e                                   (1/2 ||e||^2, the Titans loss)
  "lp":    g = p ssign(e) sabs(e)^(p-1)            (Moneta, ||e||_p^p; p = 2 gives g = 2e)
  "huber": g = e if ||e||_2 <= delta_t else delta_t ssign(e)   (Yaad; delta gets no gradient through
           the mask, only through the second branch)
  "dot":   g = -v                                  (the dot-product bias -<M(k), v> [ours: Miras §3's
           linear-attention bias, keys only enter through the backprop])
Retention (`retention`), phi maps the state to the memory weights:
  "l2": phi(W) = W                                 (Yaad, Titans without momentum)
  "lq": phi_q(A) = ssign(A) sabs(A)^(q-1) / (mean sabs(A)^q)^((q-2)/q)  per weight matrix, the rescaled
        mirror map of §7.2 [ours]; phi_2(A) = A. The printed A / ||A||_q^(q-2) form is not implemented.
  "kl": phi(Z) = c softmax_row(Z) over each row's fan-in, c learned per (head, memory layer) (§7.2).

Chunk boundaries are global (`phase`), exactly as in `titans_memory`: after a token that completes a
chunk the base is refreshed to the current state, so phase 0 implies base == state. Tokens at
positions >= lengths[b] leave the state untouched and read the state at the last real token.

Memora's "lag token" (§7.3, `lag_token=True`): the first token of every b-chunk takes its own exact
step, i.e. the base also refreshes after it (chunks of sizes {1, b-1}, still global via `phase`).

The inner gradient here is a plain `jax.vjp` per token (materialises |W| per token): an oracle.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.titans_memory.reference import compute_dtype, mlp_apply

EPS = 1e-6
STATE_KEY = {"l2": "w", "lq": "a", "kl": "z"}
BIASES = ("l2", "lp", "huber", "dot")
RETENTIONS = tuple(STATE_KEY)


def sabs(x):
  return jnp.sqrt(x * x + EPS)


def ssign(x):
  return x / sabs(x)


def phi(xs, retention, q_norm, c_L):
  """Memory weights from the state: tuple of [..., out, in]; c_L [..., L] (KL scale, "kl" only)."""
  if retention == "l2":
    return tuple(xs)
  if retention == "lq":
    out = []
    for x in xs:
      s = sabs(x)
      norm = jnp.mean(s ** q_norm, axis=(-2, -1), keepdims=True) ** ((q_norm - 2.0) / q_norm)
      out.append(ssign(x) * s ** (q_norm - 1.0) / norm)
    return tuple(out)
  if retention == "kl":
    return tuple(c_L[..., l, None, None] * jax.nn.softmax(x, axis=-1) for l, x in enumerate(xs))
  raise ValueError(f"miras_memory: unknown retention {retention!r}; choose one of {RETENTIONS}")


def output_grad(e, v, delta, bias, p):
  """g, the attentional bias' gradient w.r.t. the memory output, for rows e, v [..., D]; delta [...]."""
  if bias == "l2":
    return e
  if bias == "lp":
    return p * ssign(e) * sabs(e) ** (p - 1.0)
  if bias == "huber":
    en = lax.stop_gradient(e)
    inside = jnp.sqrt(jnp.sum(en * en, axis=-1, keepdims=True)) <= delta[..., None]
    return jnp.where(inside, e, delta[..., None] * ssign(e))
  if bias == "dot":
    return -v + 0.0 * e
  raise ValueError(f"miras_memory: unknown bias {bias!r}; choose one of {BIASES}")


def _token_grad(xb, c_L, ln_s, ln_b, k_D, v_D, delta, *, bias, p, retention, q_norm):
  """u = backprop of g through M_W at W = phi(xb), per layer [out, in] (one head, one token)."""
  wb = phi(xb, retention, q_norm, c_L)
  out, vjp = jax.vjp(lambda ws: mlp_apply(ws, ln_s, ln_b, k_D[None])[0], wb)
  g = output_grad(out - v_D, v_D, delta, bias, p)
  return vjp(g)[0]


def miras_memory_reference(q, k, v, theta, a, delta, ln_scale, ln_bias, kl_scale, *, state, bias,
                           p, retention, q_norm, chunk_size, lengths, lag_token=False):
  """The oracle: a lax.scan over tokens. Same semantics as `miras_memory`."""
  B, T, H, D = q.shape
  key = STATE_KEY[retention]
  dt = compute_dtype(q, k, v, theta, a, delta, ln_scale, ln_bias, state[key], state["base"])
  cast = lambda xs: tuple(x.astype(dt) for x in xs)
  carry0 = (cast(state[key]), cast(state["base"]), state["phase"].astype(jnp.int32))
  n_real = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  ln_s, ln_b, c_HL = ln_scale.astype(dt), ln_bias.astype(dt), kl_scale.astype(dt)
  kw = dict(bias=bias, p=p, retention=retention, q_norm=q_norm)
  grad_bh = jax.vmap(jax.vmap(lambda *xs: _token_grad(*xs, **kw), (0, 0, 0, 0, 0, 0, 0)),
                     (0, None, None, None, 0, 0, 0))
  read_bh = jax.vmap(jax.vmap(
      lambda x, c, s, b_, q_: mlp_apply(phi(x, retention, q_norm, c), s, b_, q_[None])[0],
      (0, 0, 0, 0, 0)), (0, None, None, None, 0))
  bc = lambda x: x[:, :, None, None]

  def step(carry, xs):
    x, xb, phase = carry
    t, q_BHD, k_BHD, v_BHD, th_BHL, a_BH, d_BH = xs
    u = grad_bh(xb, c_HL, ln_s, ln_b, k_BHD, v_BHD, d_BH)
    x_new = tuple(bc(a_BH) * x_l - bc(th_BHL[..., l]) * u_l for l, (x_l, u_l) in enumerate(zip(x, u)))
    phase_new = (phase + 1) % chunk_size
    # Memora's lag token (§7.3): the first token of a chunk is a chunk of its own
    fresh = (phase_new == 0) | ((phase_new == 1) & lag_token)
    xb_new = tuple(jnp.where(fresh[:, None, None, None], x_l, b_l)
                   for x_l, b_l in zip(x_new, xb))
    real = t < n_real
    keep = lambda new, old: jnp.where(real.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
    carry = jax.tree.map(keep, (x_new, xb_new, phase_new), (x, xb, phase))
    return carry, read_bh(carry[0], c_HL, ln_s, ln_b, q_BHD)

  tok = lambda x: jnp.moveaxis(x.astype(dt), 1, 0)
  xs = (jnp.arange(T), tok(q), tok(k), tok(v), tok(theta), tok(a), tok(delta))
  (x, xb, phase), y_TBHD = lax.scan(step, carry0, xs)
  return jnp.moveaxis(y_TBHD, 0, 1).astype(q.dtype), {key: x, "base": xb, "phase": phase}
