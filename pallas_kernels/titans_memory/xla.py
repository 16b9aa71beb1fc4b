"""Chunked memory engine in plain JAX: the portable, autodiff-able default for Titans and Miras.

Implements the chunked training form of Titans (Behrouz et al., arXiv 2501.00663 v1 §3.2, Eq. 16-18;
docs/architectures/titans.md) for any `rules.MemoryRule` (Miras, arXiv 2504.13173 §5.4;
docs/architectures/miras.md). Inside a chunk of b tokens every inner gradient is taken at the chunk-start
weights W_base = phi(X_base), so the momentum S and the state X are linear recurrences in the
per-token gradients u_i = g_i r_i^T (one rank-1 factor pair per memory layer):

    X_t = beta_t X_0 + f_t S_0 - sum_{i<=t} G[t, i] g_i r_i^T,    S_n = mom_n S_0 - sum_i theta_i B[n, i] g_i r_i^T
    A[t, s] = prod_{s<j<=t} a_j,  B[t, s] = prod_{s<j<=t} eta_j,  beta_t = prod_{j<=t} a_j,
    mom_t = prod_{j<=t} eta_j,  f = A diag(m) mom,  G = A diag(m) B diag(theta^(l)).

Without momentum (all of Miras) B = I and S, f, mom drop out: G = A diag(m theta^(l)) (its own code
path). The rule's attentional bias only changes the output gradient g of the batched backward
that gives the factors (g_i, r_i); its retention phi decides the read:
- phi = identity ("l2": Titans, Yaad): the dual form per layer (v1 §3.2), with Z the layer's
  input rows, Z_out = diag(beta) Z X_0^T + diag(f) Z S_0^T - (G o Z R^T) Gamma; depth 1 is the
  closed form of v1 Eq. 16-18 (E = K W_base^T - V). No per-token weights.
- otherwise ("lq": Moneta, "kl": Memora), phi at chunk ends only (Miras §5.4; rules.py): the same
  dual form over the linearised weights, with beta X_0 replaced by beta (X_0 + P (phi(X_base) -
  X_base)); the token that ends a chunk reads phi(X_n), evaluated by the next chunk (whose base
  phi(X_base) is that same matrix) or, for the last chunk, after the scan. `rule.exact_read`
  materialises the per-token states X_t of a chunk instead (n |W|) and reads phi(X_t) (a check).
The chunk-end carry is state_at(n - 1) above. X_0 (the chunk's starting state) and X_base coincide except in
the first chunk of a call that starts mid-chunk, where the carried base is the gradient base.

Choices [ours]:
- m_t (the per-token mask, 0 on padding) enters X_t = a_t X_{t-1} + m_t S_t, hence the diag(m) above;
  padding tokens also get theta = 0, eta = 1, a = 1, which makes them exactly neutral even under
  momentum (docs/architectures/titans.md).
- Split invariance (docs/architectures/titans.md): the sequence is shifted right by the carried `phase` (a per-row
  dynamic slice of a padded copy, so shapes are static under jit) and right-padded to
  NC = ceil((T + b - 1) / b) chunks: one chunk more than an aligned call needs, the price of a traced
  phase.
- The decay matrices A and B are masked cumulative products of the linear factors (no logs): a = 0
  and eta = 0 are exact, cumprod's autodiff has no division, and A and B share one helper. (The
  log-space form of the paper (v1 §3.2) would take log 0 for Miras' a = 0.)
- Memora's lag token (`rule.lag_token`; docs/architectures/miras.md): token 0 of each chunk takes its own exact step at X_0
  and the other tokens' gradients are taken at X_1 (a second batched backward per chunk).
- The chunk body is under `jax.checkpoint` and gets only (X, S, first-chunk flag, chunk inputs):
  backprop keeps chunk-boundary states (|W| per chunk, 2 |W| with momentum) plus the inputs, and
  recomputes the gradient factors and decay matrices of a chunk in the backward pass.
- Math in float32 (float64 for float64 inputs) with HIGHEST matmul precision; o in q's dtype.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.titans_memory.reference import (compute_dtype, gelu, layer_norm, memory_apply,
                                                    mlp_apply, titans_reset)
from pallas_kernels.titans_memory.rules import TITANS

_mm = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def segment_products(x_n):
  """(P [n, n] lower triangular with P[t, s] = prod_{s<j<=t} x_j, cumprod(x) [n]), without logs."""
  n = x_n.shape[0]
  idx = jnp.arange(n)
  X = jnp.where(idx[None, :] > idx[:, None], x_n[None, :], 1.0)   # X[s, j] = x_j for j > s
  P = jnp.where(idx[:, None] >= idx[None, :], jnp.cumprod(X, axis=1).T, 0.0)
  return P, jnp.cumprod(x_n)


def decay_matrices(a_n, eta_n, m_n):
  """(beta [n], f [n], A diag(m) B [n, n], mom [n], B [n, n]) of one chunk (module docstring);
  without momentum (eta_n None): (beta, None, A diag(m), None, None)."""
  A, beta = segment_products(a_n)
  Am = A * m_n[None, :]
  if eta_n is None:
    return beta, None, Am, None, None
  Bm, mom = segment_products(eta_n)
  return beta, _mm("ts,s->t", Am, mom), _mm("tj,js->ts", Am, Bm), mom, Bm


def grad_factors(rule, ws, ln_s, ln_b, k_nD, v_nD, delta_n):
  """Per-row factors of the inner gradient at ws: u_i^(l) = g_i^(l) r_i^(l)^T for every layer l.

  One batched forward/backward of the chunk's keys: g^(l) is the cotangent of a zero bias added to
  layer l's pre-activation when the memory output gets the bias' output gradient (row i only sees
  its own row), r^(l) the layer input.
  """
  L = len(ws)
  if L == 1:  # linear memory: v1 Eq. 16-18 closed form, E = K W^T - V
    e = _mm("ni,oi->no", k_nD, ws[0]) - v_nD
    return (k_nD,), (rule.output_grad(e, v_nD, delta_n),)

  def forward(biases):
    h, rs = k_nD, []
    for l, w in enumerate(ws):
      rs.append(h)
      h = _mm("ni,oi->no", h, w) + biases[l]
      if l < L - 1:
        h = gelu(h)
    return k_nD + layer_norm(h, ln_s, ln_b), tuple(rs)

  zeros = tuple(jnp.zeros((k_nD.shape[0], w.shape[0]), k_nD.dtype) for w in ws)
  out, vjp, rs = jax.vjp(forward, zeros, has_aux=True)
  gs = vjp(rule.output_grad(out - v_nD, v_nD, delta_n))[0]
  return rs, gs


def chunk_step(rule, x, s, xb, q, k, v, theta, a, eta, delta, m, keep_base, c_L, ln_s, ln_b, pb,
               q_prev=None):
  """One chunk of one (batch row, head): returns (y [n, D], X_n, S_n, the base of tokens 1..n-1,
  the retention product since that base at the chunk's last token).

  x, s, xb: tuples of [out, in] (start state, momentum or None, gradient-base state); q, k, v
  [n, D]; theta [n, L]; a, eta (or None), delta (or None), m [n]; c_L [L] or None; ln_s, ln_b [D];
  pb: the retention product from the base xb to the chunk start (1 unless the call started
  mid-chunk). keep_base (lag token only): token 0 is not real here (a call that starts mid-chunk),
  so tokens 1..n-1 keep the carried base xb.
  q_prev [D] (linearised reads only): the previous chunk's last query. That token ended its chunk
  and reads phi(X_n) of the previous chunk, which is this chunk's phi(xb): it is read here, where
  phi(xb) is computed anyway, and returned as a sixth result (`memory_xla` puts it in place).
  """
  L, n = len(x), q.shape[0]
  beta, f, AmB, mom, Bm = decay_matrices(a, eta, m)
  G = [AmB * theta[None, :, l] for l in range(L)]          # lower triangular (exact zeros)

  def state_at(t, rs, gs):
    """X_t (a static token index t), tuple of [out, in]."""
    return tuple((beta[t] * x[l] if s is None else beta[t] * x[l] + f[t] * s[l])
                 - _mm("so,s,si->oi", gs[l], G[l][t], rs[l]) for l in range(L))

  w_base = rule.phi(xb, c_L)
  lag = rule.lag_token and n > 1
  # With the lag token only token 0 takes its gradient at xb; the others take theirs at the base
  # after it (below), so only row 0 is computed here.
  rows = 1 if lag else n
  rs, gs = grad_factors(rule, w_base, ln_s, ln_b, k[:rows], v[:rows],
                        None if delta is None else delta[:rows])
  base = xb
  # The read's start term, coef_t * W0: the state's own beta_t X_0 plus, for a linearised read,
  # P_t (phi(base) - base) with P_t the retention product since the base (rules.py). Both are
  # proportional to one [n] vector, so W0 is a single matrix per layer: X_0 + pb (phi(xb) - xb)
  # with coef = beta; after Memora's lag token (base X^(0)), beta_t = a_0 A[t, 0], so
  # W0 = a_0 X_0 + phi(X^(0)) - X^(0) with coef = A[:, 0].
  coef = beta
  w0 = rule.read_weights(x, xb, pb, c_L, phi_base=w_base) if rule.reads_linearised else x
  if lag:
    x1 = tuple((beta[0] * x[l] if s is None else beta[0] * x[l] + f[0] * s[l])
               - G[l][0, 0] * jnp.outer(gs[l][0], rs[l][0]) for l in range(L))  # token 0's step
    base = tuple(jnp.where(keep_base, b_, x_) for b_, x_ in zip(xb, x1))
    w_base1 = rule.phi(base, c_L)
    rs1, gs1 = grad_factors(rule, w_base1, ln_s, ln_b, k, v, delta)
    rs = tuple(jnp.concatenate([r0, r1[1:]]) for r0, r1 in zip(rs, rs1))
    gs = tuple(jnp.concatenate([g0, g1[1:]]) for g0, g1 in zip(gs, gs1))
    if rule.reads_linearised:
      w0 = tuple(jnp.where(keep_base, w_, a[0] * x_ + p_ - x1_)
                 for w_, x_, p_, x1_ in zip(w0, x, w_base1, x1))
      coef = jnp.where(keep_base, beta, segment_products(a)[0][:, 0])
  since_base = pb * coef                                      # P_t (equal to pb beta_t without lag)
  if rule.reads_linearised or rule.weights_are_state:
    # Dual form over W_t = coef_t W0 + f_t S_0 - sum_i G[t, i] g_i r_i^T: no per-token weights.
    z = q
    for l in range(L):
      z_out = coef[:, None] * _mm("ni,oi->no", z, w0[l])
      if s is not None:
        z_out = z_out + f[:, None] * _mm("ni,oi->no", z, s[l])
      z_out = z_out - _mm("ts,so->to", G[l] * _mm("ti,si->ts", z, rs[l]), gs[l])
      z = gelu(z_out) if l < L - 1 else z_out
    y = z if L == 1 else q + layer_norm(z, ln_s, ln_b)
  else:  # exact_read: per-token states X_t for the whole chunk, read with phi(X_t)
    xs_t = tuple((beta[:, None, None] * x[l][None] if s is None else
                  beta[:, None, None] * x[l][None] + f[:, None, None] * s[l][None])
                 - _mm("ts,so,si->toi", G[l], gs[l], rs[l]) for l in range(L))
    y = mlp_apply(rule.phi(xs_t, c_L), ln_s[None], ln_b[None], q[:, None, :])[:, 0]
  x_new = state_at(n - 1, rs, gs)
  s_new = None if s is None else tuple(
      mom[-1] * s[l] - _mm("so,s,si->oi", gs[l], theta[:, l] * Bm[-1], rs[l]) for l in range(L))
  if q_prev is None:
    return y, x_new, s_new, base, since_base[-1]
  return y, x_new, s_new, base, since_base[-1], mlp_apply(w_base, ln_s, ln_b, q_prev[None])[0]


def memory_xla(rule, q, k, v, theta, a, eta, delta, ln_scale, ln_bias, c_HL, *, x, s, base, phase,
               chunk_size, lengths, base_decay=None, resets=None, reset=None, assume_aligned=False,
               chunk_fn=None):
  """The chunked engine; same arguments and result as `reference.memory_reference`.

  `assume_aligned=True` is the caller's promise that every row starts at a chunk boundary
  (phase 0, e.g. a fresh training sequence): the phase shift and its extra chunk are skipped.
  `chunk_fn` (optional) replaces the vmapped `chunk_step` of one chunk for all (batch row, head):
  same arguments and results, batched ([B, H, ...] per-head arrays, mask m and keep [B, ...], c_HL,
  ln_s, ln_b [H, ...]); the scan, checkpointing, phase shift, masks and carry stay as they are
  (e.g. the Pallas kernel of `pallas_gpu.py`).
  `resets`/`reset` as in the oracle, but every reset must start a chunk of the global grid
  (phase + t a multiple of b; `layers.packing` moves packed documents there): the chunk then starts
  from `reset`. A reset anywhere else makes every output NaN rather than silently wrong.
  """
  B, T, H, D = q.shape
  b = chunk_size
  dt = compute_dtype(q, k, v, theta, a, eta, delta, ln_scale, ln_bias, x, s, base)
  nc = -(-T // b) if assume_aligned else -(-(T + b - 1) // b)
  tp = nc * b
  phase0 = jnp.zeros((B,), jnp.int32) if assume_aligned else phase.astype(jnp.int32)
  n_real = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  real = jnp.arange(T)[None, :] < n_real[:, None]            # [B, T]

  def shift(x, fill):
    """[B, T, ...] -> [B, tp, ...] with token j at position phase0 + j, `fill` elsewhere."""
    x = x.astype(dt)
    if assume_aligned:
      return jnp.pad(x, [(0, 0), (0, tp - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    ext = jnp.pad(x, [(0, 0), (b - 1, tp - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jax.vmap(lambda e, p: lax.dynamic_slice_in_dim(e, b - 1 - p, tp, 0))(ext, phase0)

  def chunks(x):
    """[B, tp, H, ...] -> [nc, B, H, b, ...]."""
    x = x.reshape((B, nc, b) + x.shape[2:])
    return jnp.moveaxis(x, (1, 3), (0, 2))

  def gate(g, fill):  # per-token gate [B, T, H]: `fill` (neutral) on padding
    return None if g is None else chunks(shift(jnp.where(real[..., None], g, fill), fill))

  xs = (chunks(shift(q, 0.0)), chunks(shift(k, 0.0)), chunks(shift(v, 0.0)),
        chunks(shift(jnp.where(real[..., None, None], theta, 0), 0.0)),
        gate(a, 1.0), gate(eta, 1.0), gate(delta, 1.0),
        jnp.moveaxis(shift(real, 0.0).reshape(B, nc, b), 1, 0))
  if resets is not None:
    r_bc = shift(resets & real, 0.0).reshape(B, nc, b) > 0
    misplaced = jnp.any(r_bc[:, :, 1:])
    resets_c = jnp.moveaxis(r_bc[:, :, 0], 1, 0)               # [nc, B]: chunk c starts a document
  ln_s, ln_b = ln_scale.astype(dt), ln_bias.astype(dt)
  c_HL = None if c_HL is None else c_HL.astype(dt)
  cast = lambda xs: None if xs is None else tuple(t.astype(dt) for t in xs)
  x0, s0, xb0 = cast(x), cast(s), cast(base)
  pb0 = jnp.ones((B, H), dt) if base_decay is None else base_decay.astype(dt)
  if resets is not None:
    r_x, r_s = cast(reset[0]), cast(reset[1])
  c_last = (phase0 + n_real - 1) // b                         # chunk of the last real token (-1: none)
  lag = rule.lag_token and b > 1
  # heads share the row's mask and lag flag; batch rows share the KL scale and LayerNorm affine
  step = functools.partial(chunk_step, dataclasses.replace(rule, lag_token=lag))
  lin = rule.reads_linearised
  step_bh = jax.vmap(jax.vmap(step, in_axes=(0,) * 10 + (None, None, 0, 0, 0, 0) + (0,) * lin),
                     in_axes=(0,) * 12 + (None, None, None, 0) + (0,) * lin)
  if lin:  # each chunk also gets the previous chunk's last query (chunk_step: q_prev)
    q_last = xs[0][:, :, :, -1]                                # [nc, B, H, D]
    xs = xs + (jnp.concatenate([jnp.zeros_like(q_last[:1]), q_last[:-1]]),)

  @jax.checkpoint
  def compute(x, s, first, xs_c):
    first = jnp.broadcast_to(first, (B,))
    xb = tuple(jnp.where(first[:, None, None, None], b0, x_) for b0, x_ in zip(xb0, x))
    pb = jnp.where(first[:, None], pb0, 1.0)                    # [B, H]
    keep = first & (phase0 > 0)                                # [B]
    return (step_bh if chunk_fn is None else chunk_fn)(x, s, xb, *xs_c[:8], keep, c_HL, ln_s, ln_b,
                                                       pb, *xs_c[8:])

  def end_read(x, q_BHD):
    """M_{phi(X)}(q) for one query per (row, head): the read of a chunk-ending token."""
    w = rule.phi(x, None if c_HL is None else c_HL[None])
    return mlp_apply(w, ln_s[None], ln_b[None], q_BHD[:, :, None, :])[:, :, 0]

  def body(carry, inp):
    x, s, sel, pb_sel = carry
    c, xs_c, *r = inp
    first = c == 0
    if resets is not None:  # a document starts here: the chunk runs from the reset state, as alone
      r = r[0]
      rf = r.astype(dt)[:, None, None, None]
      rb = lambda n, o: n * rf + o * (1 - rf)   # a 0/1 blend, like `sel` below
      x_pre = x
      x = tuple(map(rb, r_x, x))
      s = None if s is None else tuple(map(rb, r_s, s))
      first = first & ~r
    y, x_new, s_new, base, pb_end, *y_prev = compute(x, s, first, xs_c)
    if y_prev:
      y_prev = y_prev[0]
      if resets is not None:
        # the previous chunk's last token reads phi of ITS end state, not of the reset state
        y_prev = jnp.where(r[:, None, None], end_read(x_pre, xs_c[8]), y_prev)
      y = (y, y_prev)
    # A 0/1 blend instead of jnp.where: the backward then keeps a [B] flag per chunk, not a
    # predicate broadcast to |W|; with h in {0, 1} the blend is exact.
    h = (c == c_last).astype(dt)
    sel = tuple(b_ * h[:, None, None, None] + o * (1 - h[:, None, None, None])
                for b_, o in zip(base, sel))
    return (x_new, s_new, sel, pb_end * h[:, None] + pb_sel * (1 - h[:, None])), y

  # Titans over a few chunks (CPU-sized training, MAC segments, decode steps) is unrolled: the
  # while loop's per-iteration overhead dominated there. Without momentum (Miras) the rolled loop
  # is as fast and XLA does not keep every unrolled chunk's recomputed temporaries alive at once
  # (docs/results.md, Miras step cost).
  unroll = nc if nc <= 4 and rule.momentum else 1
  scanned = (jnp.arange(nc), xs) + (() if resets is None else (resets_c,))
  (x_end, s_end, sel, pb_sel), y = lax.scan(body, (x0, s0, xb0, pb0), scanned, unroll=unroll)
  if lin:
    # Token b-1 of every chunk ends it and reads phi(X_n): chunk c + 1 read it (chunk_step's
    # q_prev); the last chunk's reads phi(X_n) of the final state here. Only real tokens are set.
    y, y_prev = y
    y_last = end_read(x_end, q_last[-1])                       # [B, H, D]
    y_ends = jnp.concatenate([y_prev[1:], y_last[None]])       # [nc, B, H, D]
    ends_real = xs[7][:, :, -1] > 0                            # [nc, B]
    y = y.at[:, :, :, -1].set(jnp.where(ends_real[:, :, None, None], y_ends, y[:, :, :, -1]))
  y = jnp.moveaxis(y, (0, 2), (1, 3)).reshape(B, tp, H, D)    # [nc, B, H, b, D] -> [B, tp, H, D]
  if assume_aligned:
    o = y[:, :T]
  else:
    o = jax.vmap(lambda x, p: lax.dynamic_slice_in_dim(x, p, T, 0))(y, phase0)
  phase = (phase0 + n_real) % b
  fresh = (phase == 0) | ((phase == 1) & lag)                  # the base is the current state
  refresh = (fresh & (n_real > 0))[:, None, None, None]
  base = tuple(jnp.where(refresh, x_, o_) for x_, o_ in zip(x_end, sel))
  base_decay = jnp.where(refresh[:, :, 0, 0], 1.0, pb_sel)
  if rule.reads_linearised and lengths is not None:
    # Padding reads the weights of the last real token (as the oracle does). Inside the scan a
    # chunk wholly after it would start from a fresh base; one read of the final state fixes that.
    w_end = rule.read_weights(x_end, base, base_decay, None if c_HL is None else c_HL[None])
    o_end = memory_apply(w_end, ln_s, ln_b, q)
    o = jnp.where(real[:, :, None, None], o, o_end)
  if resets is not None:
    o = jnp.where(misplaced, jnp.nan, o)
  return o.astype(q.dtype), (x_end, s_end, base, phase, base_decay)


def titans_memory_xla(q, k, v, theta, eta, log_a, ln_scale, ln_bias, *, state, chunk_size=16,
                      lengths=None, resets=None, reset_state=None, assume_aligned=False):
  """The engine with the Titans rule; same signature and semantics as `titans_memory` (inputs
  already validated)."""
  o, (w, s, wb, phase, _) = memory_xla(
      TITANS, q, k, v, theta, jnp.exp(log_a), eta, None, ln_scale, ln_bias, None, x=state["w"],
      s=state["s"], base=state["w_base"], phase=state["phase"], chunk_size=chunk_size,
      lengths=lengths, resets=resets, reset=titans_reset(reset_state),
      assume_aligned=assume_aligned)
  return o, {"w": w, "s": s, "w_base": wb, "phase": phase}
