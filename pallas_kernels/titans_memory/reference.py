"""Token-by-token oracle for the Titans neural memory (Behrouz et al., arXiv 2501.00663 v1, Eq. 13-15).

Per head, with gradients at the chunk-start weights (v1 §3.2; docs/architectures/titans.md):

    u_t = grad_W 1/2 ||M_W(k_t) - v_t||^2  at W = W_base   (W_base: weights at the chunk start)
    S_t = eta_t S_{t-1} - theta_t u_t           (theta per memory layer)
    W_t = a_t W_{t-1} + S_t                     (a_t = exp(log_a_t))
    y_t = M_{W_t}(q_t)                          (read after write [ours])

This is `memory_reference`, the engine's token loop; the Titans op runs it with the Titans rule
(`rules.TITANS`: l2 bias, l2 retention, momentum), the Miras memories
(`pallas_kernels.miras_memory`) with other pieces (`rules.MemoryRule`).

Chunk boundaries are global: the state carries `phase`, the number of tokens of the current chunk
already consumed, and `w_base`. After a token that completes a chunk (phase wraps to 0) the base is
refreshed to the current weights, so a state with phase 0 always has w_base == w [ours: a canonical
state, which makes "final states are equal" a meaningful test of split invariance].

Memory model M_W (docs/architectures/titans.md): depth 1 is linear, M_W(x) = W x. Depth L >= 2 is
M_W(x) = x + LN(W_L gelu(... gelu(W_1 x))) with exact (erf) GELU [ours: the paper says only "GELU";
erf is smooth to every order we differentiate], LayerNorm over the D features with eps 1e-5 and an
outer-loop-only affine. The inner gradient is a plain `jax.vjp` of M per token (the bias' output
gradient pulled back): no factorisation, obviously correct, and it materialises a full weight
gradient per token (an oracle, not a training path).

Tokens at positions >= `lengths[b]` (right padding, optional) leave the state untouched; their output
is the read of the state at the last real token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import compute_dtype
from pallas_kernels.titans_memory.engine import MemoryInputs, MemoryParams, MemoryState, scaled

LN_EPS = 1e-5


def gelu(x):
  return jax.nn.gelu(x, approximate=False)


def layer_norm(x, scale, bias):
  """LayerNorm over the last axis (eps 1e-5), affine broadcast from the right."""
  mu = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mu
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return xc * lax.rsqrt(var + LN_EPS) * scale + bias


def mlp_apply(ws, ln_scale, ln_bias, x, scales=None):
  """M_W(x) for weights ws (tuple of [..., out, in]) and rows x [..., N, D]; ln_* [..., D].

  Leading axes of ws, ln_* and x (before N) must match; ln_* get a row axis inserted here.
  scales: optional per-layer factors (None or broadcastable to [..., 1, 1]): W_l = scales[l] ws[l],
  applied after the matmul (`rules.MemoryRule.phi_factored`).
  """
  scales = (None,) * len(ws) if scales is None else scales
  if len(ws) == 1:
    return scaled(scales[0], jnp.einsum("...oi,...ni->...no", ws[0], x))
  h = x
  for l, w in enumerate(ws):
    h = scaled(scales[l], jnp.einsum("...oi,...ni->...no", w, h))
    if l < len(ws) - 1:
      h = gelu(h)
  return x + layer_norm(h, ln_scale[..., None, :], ln_bias[..., None, :])


def memory_apply(w, ln_scale_HD, ln_bias_HD, x_BTHD):
  """Reads the memory: M_W(x) per batch row and head.

  Args:
    w: tuple of per-layer weights [B, H, out, in] (e.g. a state's "w" or "w_base").
    ln_scale_HD, ln_bias_HD: outer-loop LayerNorm affine [H, D] (ignored at depth 1).
    x_BTHD: rows to read [B, T, H, D].
  Returns: [B, T, H, D] in the compute dtype (float32, or float64 for float64 inputs).
  """
  dt = compute_dtype(w, x_BTHD, ln_scale_HD, ln_bias_HD)
  w = tuple(x.astype(dt) for x in w)
  x = jnp.swapaxes(x_BTHD.astype(dt), 1, 2)                  # [B, H, T, D]
  y = mlp_apply(w, ln_scale_HD.astype(dt)[None], ln_bias_HD.astype(dt)[None], x)
  return jnp.swapaxes(y, 1, 2)


def inner_loss(ws, ln_scale_D, ln_bias_D, k_D, v_D):
  """1/2 ||M_W(k) - v||^2, summed over features [ours]."""
  e = mlp_apply(ws, ln_scale_D, ln_bias_D, k_D[None])[0] - v_D
  return 0.5 * jnp.sum(e * e)


def token_grads(rule, xb, params: MemoryParams, k_D, v_D, delta):
  """u = backprop of the bias gradient g through M at W = phi(xb), per layer [out, in] (one head,
  one token; params per head: ln [D], kl_scale [L] or None): a plain `jax.vjp`, materialising |W|
  per token (an oracle, not a training path)."""
  ln_s, ln_b, c_L = params
  out, vjp = jax.vjp(lambda ws: mlp_apply(ws, ln_s, ln_b, k_D[None])[0], rule.phi(xb, c_L))
  return vjp(rule.output_grad(out - v_D, v_D, delta))[0]


def memory_reference(rule, inputs: MemoryInputs, params: MemoryParams, state: MemoryState, *,
                     chunk_size, lengths=None, reset: MemoryState | None = None,
                     assume_aligned=False):
  """The engine's oracle: a lax.scan over tokens, for any `rules.MemoryRule`.

  Per token (all [B, H] at once), with u at W_base = phi(X_base):
      momentum:    S_t = eta_t S_{t-1} - theta_t u_t,  X_t = a_t X_{t-1} + S_t
      no momentum: X_t = a_t X_{t-1} - theta_t u_t
      y_t = M_{W_t}(q_t),  W_t = rule.read_weights(X_t, X_base, P_t)
  where P_t is the product of a since the base (phi(X_t) after a chunk end, or always with an
  identity phi or `exact_read`; see rules.py).
  Args: the typed groups of `engine` (inputs.eta None without momentum, inputs.delta None unless
  Huber, params.kl_scale None unless "kl", state.s None without momentum, state.base_decay None
  for ones); lengths [B] or None (right padding). With inputs.resets [B, T], before a token with
  resets[b, t] (a packed document's first token) the state becomes `reset` (its phase is ignored)
  and the chunk grid restarts there (phase 0), as if the document ran alone. assume_aligned: the
  chunked paths' promise of phase 0, which the token loop does not need (ignored).
  Returns: (o [B, T, H, D] in q's dtype, the final MemoryState).
  """
  del assume_aligned
  q, k, v, theta, a, eta, delta, resets = inputs
  B, T, H, D = q.shape
  dt = compute_dtype(inputs, params.ln_scale, params.ln_bias, state.x, state.s, state.base)
  cast = lambda xs: None if xs is None else tuple(t.astype(dt) for t in xs)
  ones_BH = jnp.ones((B, H), dt)
  pb0 = ones_BH if state.base_decay is None else state.base_decay.astype(dt)
  carry0 = MemoryState(cast(state.x), cast(state.s), cast(state.base),
                       state.phase.astype(jnp.int32), pb0)
  n_real = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  prm = jax.tree.map(lambda t: t.astype(dt), params)
  # heads: own weights, tokens and params; batch rows: own weights and tokens, shared params
  grad_bh = jax.vmap(jax.vmap(functools.partial(token_grads, rule)), (0, None, 0, 0, 0))
  read_bh = jax.vmap(jax.vmap(
      lambda x_, xb_, pb_, p_, q_: mlp_apply(rule.read_weights(x_, xb_, pb_, p_.kl_scale),
                                             p_.ln_scale, p_.ln_bias, q_[None])[0]),
      (0, 0, 0, None, 0))
  bc = lambda g: g[:, :, None, None]

  if resets is not None:
    reset_carry = MemoryState(
        cast(reset.x), cast(reset.s), cast(reset.base), jnp.zeros((B,), jnp.int32),
        ones_BH if reset.base_decay is None else reset.base_decay.astype(dt))

  def step(carry, xs):
    t, tok = xs
    if resets is not None:
      r = resets[:, t] & (t < n_real)
      carry = jax.tree.map(lambda n, o: jnp.where(r.reshape((B,) + (1,) * (o.ndim - 1)), n, o),
                           reset_carry, carry)
    x, s, xb, phase, pb = carry
    u = grad_bh(xb, prm, tok.k, tok.v, tok.delta)
    upd = tuple(-bc(tok.theta[..., l]) * u_l for l, u_l in enumerate(u))
    if rule.momentum:
      s = upd = tuple(bc(tok.eta) * s_l + d_l for s_l, d_l in zip(s, upd))
    x_new = tuple(bc(tok.a) * x_l + d_l for x_l, d_l in zip(x, upd))
    phase_new = (phase + 1) % chunk_size
    # the base refreshes when a chunk completes; with the lag token also after a chunk's first token
    fresh = (phase_new == 0) | ((phase_new == 1) & rule.lag_token)
    xb_new = tuple(jnp.where(fresh[:, None, None, None], x_l, b_l) for x_l, b_l in zip(x_new, xb))
    pb_new = jnp.where(fresh[:, None], 1.0, pb * tok.a)
    real = t < n_real
    keep = lambda new, old: jnp.where(real.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
    carry = jax.tree.map(keep, MemoryState(x_new, s, xb_new, phase_new, pb_new), carry)
    return carry, read_bh(carry.x, carry.base, carry.base_decay, prm, tok.q)

  tok = jax.tree.map(lambda g: jnp.moveaxis(g.astype(dt), 1, 0), inputs._replace(resets=None))
  carry, y_TBHD = lax.scan(step, carry0, (jnp.arange(T), tok))
  return jnp.moveaxis(y_TBHD, 0, 1).astype(q.dtype), carry
