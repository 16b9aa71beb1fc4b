"""Token-by-token oracle for the Titans neural memory (Behrouz et al., arXiv 2501.00663 v1, Eq. 13-15).

Per head, with gradients at the chunk-start weights (v1 §3.2; docs/architectures/titans.md):

    u_t = grad_W 1/2 ||M_W(k_t) - v_t||^2  at W = W_base   (W_base: weights at the chunk start)
    S_t = eta_t S_{t-1} - theta_t u_t           (theta per memory layer)
    W_t = a_t W_{t-1} + S_t                     (a_t = exp(log_a_t))
    y_t = M_{W_t}(q_t)                          (read after write [ours])

This is `memory_reference`, the engine's token loop, with the Titans rule (`rules.TITANS`: l2 bias,
l2 retention, momentum); the Miras memories (`pallas_kernels.miras_memory`) run the same loop with
other pieces (`rules.MemoryRule`).

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

from pallas_kernels.titans_memory.rules import TITANS

LN_EPS = 1e-5


def compute_dtype(*xs):
  """float64 when any input is float64 (exact tests), float32 otherwise."""
  return jnp.float64 if any(x is not None and x.dtype == jnp.float64
                            for x in jax.tree.leaves(xs)) else jnp.float32


def gelu(x):
  return jax.nn.gelu(x, approximate=False)


def layer_norm(x, scale, bias):
  """LayerNorm over the last axis (eps 1e-5), affine broadcast from the right."""
  mu = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mu
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return xc * lax.rsqrt(var + LN_EPS) * scale + bias


def mlp_apply(ws, ln_scale, ln_bias, x):
  """M_W(x) for weights ws (tuple of [..., out, in]) and rows x [..., N, D]; ln_* [..., D].

  Leading axes of ws, ln_* and x (before N) must match; ln_* get a row axis inserted here.
  """
  if len(ws) == 1:
    return jnp.einsum("...oi,...ni->...no", ws[0], x)
  h = x
  for l, w in enumerate(ws):
    h = jnp.einsum("...oi,...ni->...no", w, h)
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


def token_grads(rule, xb, c_L, ln_s, ln_b, k_D, v_D, delta):
  """u = backprop of the bias gradient g through M at W = phi(xb), per layer [out, in] (one head, one
  token): a plain `jax.vjp`, materialising |W| per token (an oracle, not a training path)."""
  out, vjp = jax.vjp(lambda ws: mlp_apply(ws, ln_s, ln_b, k_D[None])[0], rule.phi(xb, c_L))
  return vjp(rule.output_grad(out - v_D, v_D, delta))[0]


def memory_reference(rule, q, k, v, theta, a, eta, delta, ln_scale, ln_bias, c_HL, *, x, s, base,
                     phase, chunk_size, lengths, base_decay=None, resets=None, reset=None):
  """The engine's oracle: a lax.scan over tokens, for any `rules.MemoryRule`.

  Per token (all [B, H] at once), with u at W_base = phi(X_base):
      momentum:    S_t = eta_t S_{t-1} - theta_t u_t,  X_t = a_t X_{t-1} + S_t
      no momentum: X_t = a_t X_{t-1} - theta_t u_t
      y_t = M_{W_t}(q_t),  W_t = rule.read_weights(X_t, X_base, P_t)
  where P_t is the product of a since the base (phi(X_t) after a chunk end, or always with an
  identity phi or `exact_read`; see rules.py).
  Args: q, k, v [B, T, H, D]; theta [B, T, H, L]; a (linear retention factor), eta (None without
  momentum), delta (None unless Huber) [B, T, H]; ln_* [H, D]; c_HL [H, L] or None (the "kl" scale);
  x, s (None without momentum), base: tuples of [B, H, out, in]; phase [B]; lengths [B] or None;
  base_decay [B, H] or None (ones): P at the start. resets [B, T] bool or None: before a token
  with resets[b, t] (a packed document's first token) the state becomes `reset` = (x, s, base,
  base_decay) and the chunk grid restarts there (phase 0), as if the document ran alone.
  Returns: (o [B, T, H, D] in q's dtype, (x, s, base, phase, base_decay)).
  """
  B, T, H, D = q.shape
  dt = compute_dtype(q, k, v, theta, a, eta, delta, ln_scale, ln_bias, x, s, base)
  cast = lambda xs: None if xs is None else tuple(t.astype(dt) for t in xs)
  pb0 = jnp.ones((B, H), dt) if base_decay is None else base_decay.astype(dt)
  carry0 = (cast(x), cast(s), cast(base), phase.astype(jnp.int32), pb0)
  n_real = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  ln_s, ln_b = ln_scale.astype(dt), ln_bias.astype(dt)
  c_HL = None if c_HL is None else c_HL.astype(dt)
  grad_bh = jax.vmap(jax.vmap(functools.partial(token_grads, rule), (0, 0, 0, 0, 0, 0, 0)),
                     (0, None, None, None, 0, 0, 0))
  read_bh = jax.vmap(jax.vmap(
      lambda x_, xb_, pb_, c, s_, b_, q_: mlp_apply(rule.read_weights(x_, xb_, pb_, c), s_, b_,
                                                     q_[None])[0], (0, 0, 0, 0, 0, 0, 0)),
      (0, 0, 0, None, None, None, 0))
  bc = lambda g: g[:, :, None, None]

  if resets is not None:
    r_x, r_s, r_b = cast(reset[0]), cast(reset[1]), cast(reset[2])
    r_pb = jnp.ones((B, H), dt) if reset[3] is None else reset[3].astype(dt)
    reset_carry = (r_x, r_s, r_b, jnp.zeros((B,), jnp.int32), r_pb)

  def step(carry, xs):
    t, q_BHD, k_BHD, v_BHD, th_BHL, a_BH, eta_BH, d_BH = xs
    if resets is not None:
      r = resets[:, t] & (t < n_real)
      carry = jax.tree.map(lambda n, o: jnp.where(r.reshape((B,) + (1,) * (o.ndim - 1)), n, o),
                           reset_carry, carry)
    x, s, xb, phase, pb = carry
    u = grad_bh(xb, c_HL, ln_s, ln_b, k_BHD, v_BHD, d_BH)
    upd = tuple(-bc(th_BHL[..., l]) * u_l for l, u_l in enumerate(u))
    if rule.momentum:
      s = upd = tuple(bc(eta_BH) * s_l + d_l for s_l, d_l in zip(s, upd))
    x_new = tuple(bc(a_BH) * x_l + d_l for x_l, d_l in zip(x, upd))
    phase_new = (phase + 1) % chunk_size
    # the base refreshes when a chunk completes; with the lag token also after a chunk's first token
    fresh = (phase_new == 0) | ((phase_new == 1) & rule.lag_token)
    xb_new = tuple(jnp.where(fresh[:, None, None, None], x_l, b_l) for x_l, b_l in zip(x_new, xb))
    pb_new = jnp.where(fresh[:, None], 1.0, pb * a_BH)
    real = t < n_real
    keep = lambda new, old: jnp.where(real.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
    carry = jax.tree.map(keep, (x_new, s, xb_new, phase_new, pb_new), carry)
    return carry, read_bh(carry[0], carry[2], carry[4], c_HL, ln_s, ln_b, q_BHD)

  tok = lambda g: None if g is None else jnp.moveaxis(g.astype(dt), 1, 0)
  xs = (jnp.arange(T), tok(q), tok(k), tok(v), tok(theta), tok(a), tok(eta), tok(delta))
  carry, y_TBHD = lax.scan(step, carry0, xs)
  return jnp.moveaxis(y_TBHD, 0, 1).astype(q.dtype), carry


def titans_memory_reference(q, k, v, theta, eta, log_a, ln_scale, ln_bias, *, state,
                            chunk_size=16, lengths=None, resets=None, reset_state=None):
  """The oracle: the engine with the Titans rule. Same signature and semantics as `titans_memory`."""
  o, (w, s, wb, phase, _) = memory_reference(
      TITANS, q, k, v, theta, jnp.exp(log_a), eta, None, ln_scale, ln_bias, None, x=state["w"],
      s=state["s"], base=state["w_base"], phase=state["phase"], chunk_size=chunk_size,
      lengths=lengths, resets=resets, reset=titans_reset(reset_state))
  return o, {"w": w, "s": s, "w_base": wb, "phase": phase}


def titans_reset(state):
  """A Titans state dict -> the engine's reset tuple (x, s, base, base_decay), or None."""
  return None if state is None else (state["w"], state["s"], state["w_base"], None)
