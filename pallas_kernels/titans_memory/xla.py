"""Chunked memory engine in plain JAX: the portable, autodiff-able default for Titans and Miras.

Implements the chunked training form of Titans (Behrouz et al., arXiv 2501.00663 v1 §3.2, Eq. 16-18;
docs/architectures/titans.md) for any `rules.MemoryRule` (Miras, arXiv 2504.13173 §5.4;
docs/architectures/miras.md). Inside a chunk of b tokens every inner gradient is taken at the
chunk-start weights W_base = phi(X_base), so the momentum S and the state X are linear recurrences
in the per-token gradients u_i = g_i r_i^T (one rank-1 factor pair per memory layer):

    X_t = beta_t X_0 + f_t S_0 - sum_{i<=t} G[t, i] g_i r_i^T,
    S_n = mom_n S_0 - sum_i theta_i B[n, i] g_i r_i^T,
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
The read and the chunk-end carry are `engine.read_and_carry`, the same code the Pallas kernel runs.
X_0 (the chunk's starting state) and X_base coincide except in the first chunk of a call that
starts mid-chunk, where the carried base is the gradient base.

Choices [ours]:
- m_t (the per-token mask, 0 on padding) enters X_t = a_t X_{t-1} + m_t S_t, hence the diag(m) above;
  padding tokens also get theta = 0, eta = 1, a = 1, which makes them exactly neutral even under
  momentum (docs/architectures/titans.md).
- Split invariance (docs/architectures/titans.md): the sequence is shifted right by the carried
  `phase` (a per-row dynamic slice of a padded copy, so shapes are static under jit) and
  right-padded to NC = ceil((T + b - 1) / b) chunks: one chunk more than an aligned call needs, the
  price of a traced phase.
- The decay matrices A and B are masked cumulative products of the linear factors (no logs): a = 0
  and eta = 0 are exact, cumprod's autodiff has no division, and A and B share one helper. (The
  log-space form of the paper (v1 §3.2) would take log 0 for Miras' a = 0.)
- Memora's lag token (`rule.lag_token`; docs/architectures/miras.md): token 0 of each chunk takes
  its own exact step at X_0 and the other tokens' gradients are taken at X_1 (a second batched
  backward per chunk).
- The chunk body is under `jax.checkpoint` and gets only (X, S, first-chunk flag, chunk inputs):
  backprop keeps chunk-boundary states (|W| per chunk, 2 |W| with momentum) plus the inputs, and
  recomputes the gradient factors and decay matrices of a chunk in the backward pass.
- The Titans rule at depth 1 or 2 backpropagates through a chunk with the VJP written out by hand
  (`chunk_vjp`, shared with the Pallas kernel; `titans_chunk_fn`) rather than autodiff of the
  vjp inside `grad_factors`: the same math, a smaller program (docs/results.md).
- Math in float32 (float64 for float64 inputs) with HIGHEST matmul precision; o in q's dtype.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import compute_dtype, dot
from pallas_kernels.titans_memory import chunk_vjp
from pallas_kernels.titans_memory.engine import (
  ChunkCarry,
  ChunkEnds,
  ChunkOut,
  ChunkTokens,
  DotOps,
  MemoryInputs,
  MemoryParams,
  MemoryState,
  read_and_carry,
  scaled,
)
from pallas_kernels.titans_memory.reference import gelu, layer_norm, memory_apply, mlp_apply
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


def grad_factors(rule, ws, ln_s, ln_b, k_nD, v_nD, delta_n, scales=None):
  """Per-row factors of the inner gradient at ws: u_i^(l) = g_i^(l) r_i^(l)^T for every layer l
  (scales: optional per-layer factors, W_l = scales[l] ws[l]; `rules.MemoryRule.phi_factored`).

  One batched forward/backward of the chunk's keys: g^(l) is the cotangent of a zero bias added to
  layer l's pre-activation when the memory output gets the bias' output gradient (row i only sees
  its own row), r^(l) the layer input.
  """
  L = len(ws)
  scales = (None,) * L if scales is None else scales
  mm = lambda h, l: scaled(scales[l], _mm("ni,oi->no", h, ws[l]))
  if L == 1:  # linear memory: v1 Eq. 16-18 closed form, E = K W^T - V
    e = mm(k_nD, 0) - v_nD
    return (k_nD,), (rule.output_grad(e, v_nD, delta_n),)

  def forward(biases):
    h, rs = k_nD, []
    for l in range(L):
      rs.append(h)
      h = mm(h, l) + biases[l]
      if l < L - 1:
        h = gelu(h)
    return k_nD + layer_norm(h, ln_s, ln_b), tuple(rs)

  zeros = tuple(jnp.zeros((k_nD.shape[0], w.shape[0]), k_nD.dtype) for w in ws)
  out, vjp, rs = jax.vjp(forward, zeros, has_aux=True)
  gs = vjp(rule.output_grad(out - v_nD, v_nD, delta_n))[0]
  return rs, gs


XLA_OPS = DotOps(mm=lambda a, b: _mm("ts,so->to", a, b), mm_t=lambda a, b: _mm("ni,oi->no", a, b),
                 t_mm=lambda a, b: _mm("so,si->oi", a, b), gelu=gelu, layer_norm=layer_norm)


def chunk_inputs(carry: ChunkCarry, tok: ChunkTokens, params: MemoryParams):
  """One chunk of every (b, h) as the Titans rule's tiles (`chunk_vjp.ChunkIn`, batched [B, H, ...];
  the LN affine [H, 1, D]): the decay matrices with theta folded in, the carry columns and the
  states; and the retention product since the base at the chunk's last token [B, H]."""
  x, s, xb, pb = carry
  beta, f, AmB, mom, Bm = jax.vmap(jax.vmap(decay_matrices, (0, 0, None)))(tok.a, tok.eta, tok.m)
  col = lambda t: t[..., None]
  G = tuple(AmB * tok.theta[..., None, :, l] for l in range(len(x)))
  ins = chunk_vjp.ChunkIn(
      q=tok.q, k=tok.k, v=tok.v, beta=col(beta), f=col(f), beta_n=col(beta[..., -1:]),
      f_n=col(f[..., -1:]), mom_n=col(mom[..., -1:]), G=G,
      g_end=tuple(col(g[..., -1, :]) for g in G),
      s_end=tuple(col(tok.theta[..., l] * Bm[..., -1, :]) for l in range(len(x))),
      x=tuple(x), s=tuple(s), xb=tuple(xb), ln_s=params.ln_scale[:, None, :],
      ln_b=params.ln_bias[:, None, :])
  return ins, pb * beta[..., -1]


_tile_dot = functools.partial(dot, precision=lax.Precision.HIGHEST)   # 2-D, in the inputs' dtype
TILE_OPS = DotOps(
    mm=_tile_dot, mm_t=functools.partial(_tile_dot, tb=True),
    t_mm=functools.partial(_tile_dot, ta=True), gelu=gelu, layer_norm=chunk_vjp.layer_norm,
    gelu_grad=chunk_vjp.gelu_grad)


def _per_row_and_head(fn):
  """fn over one (b, h) tile, vmapped over [B, H, ...] (the LN affine [H, 1, D] has no B axis)."""
  def batched(ins, *rest):
    axes = jax.tree.map(lambda _: 0, ins)
    inner = jax.vmap(fn, (axes,) + (0,) * len(rest))
    return jax.vmap(inner, (axes._replace(ln_s=None, ln_b=None),) + (0,) * len(rest))(ins, *rest)
  return batched


@jax.custom_vjp
def _titans_chunk(ins):
  return _per_row_and_head(functools.partial(chunk_vjp.chunk_math, TILE_OPS))(ins)


def _titans_chunk_fwd(ins):
  return _titans_chunk(ins), ins       # residuals: the inputs (the VJP recomputes the rows)


def _titans_chunk_bwd(ins, cts):
  d = _per_row_and_head(functools.partial(chunk_vjp.chunk_cotangents, TILE_OPS))(ins, cts)
  return (d._replace(ln_s=d.ln_s.sum(0), ln_b=d.ln_b.sum(0)),)


_titans_chunk.defvjp(_titans_chunk_fwd, _titans_chunk_bwd)


def titans_chunk_fn(carry: ChunkCarry, tok: ChunkTokens, params: MemoryParams, keep) -> ChunkOut:
  """`memory_xla`'s chunk_fn for the Titans rule at depth 1 or 2: `chunk_step`'s result through
  the hand-written VJP of `chunk_vjp` (the same math; its program is smaller than autodiff's of
  the vjp inside `grad_factors`, docs/results.md). The base passes through (no lag token)."""
  del keep
  ins, since_base = chunk_inputs(carry, tok, params)
  y, x_new, s_new = _titans_chunk(ins)
  return ChunkOut(y, x_new, s_new, carry.xb, since_base)


def chunk_step(rule, carry: ChunkCarry, tok: ChunkTokens, params: MemoryParams,
               keep_base) -> ChunkOut:
  """One chunk of one (batch row, head) (`engine.ChunkTokens`, `engine.ChunkCarry`; params per head:
  ln [D], kl_scale [L] or None).

  carry.pb is the retention product from the base xb to the chunk start (1 unless the call started
  mid-chunk). keep_base (lag token only): token 0 is not real here (a call that starts mid-chunk),
  so tokens 1..n-1 keep the carried base xb. keep_base None: the caller's static promise that the
  chunk starts at its base (xb is x, pb = 1, keep_base False), as in every chunk of an aligned call.
  tok.q_prev (linearised reads only): the previous chunk's last query. That token ended its chunk
  and reads phi(X_n) of the previous chunk, which is this chunk's phi(xb): it is read here, where
  phi(xb) is computed anyway, and returned as y_prev (`memory_xla` puts it in place).
  """
  x, s, xb, pb = carry
  ln_s, ln_b, c_L = params
  L, n = len(x), tok.q.shape[0]
  beta, f, AmB, mom, Bm = decay_matrices(tok.a, tok.eta, tok.m)
  G = [AmB * tok.theta[None, :, l] for l in range(L)]      # lower triangular (exact zeros)

  # phi(xb) as W = scale * mat ("kl": c and the row softmaxes; readers apply c after their
  # matmuls, so no weight-sized c * softmax is formed); `full` builds W where a sum needs it.
  mats, scales = rule.phi_factored(xb, c_L)
  full = lambda ms, cs: tuple(map(scaled, cs, ms))
  lag = rule.lag_token and n > 1
  # With the lag token only token 0 takes its gradient at xb; the others take theirs at the base
  # after it (below), so only row 0 is computed here.
  rows = 1 if lag else n
  rs, gs = grad_factors(rule, mats, ln_s, ln_b, tok.k[:rows], tok.v[:rows],
                        None if tok.delta is None else tok.delta[:rows], scales)
  base = xb
  # The read's start term, coef_t * W0: the state's own beta_t X_0 plus, for a linearised read,
  # P_t (phi(base) - J(base)) with P_t the retention product since the base and J the read's
  # linear map (rules.py; the identity unless "kl"). Both are proportional to one [n] vector, so
  # W0 is a single matrix per layer: J(X_0) + pb (phi(xb) - J(xb)) with coef = beta; after
  # Memora's lag token (base X^(0)), beta_t = a_0 A[t, 0], so W0 = a_0 J(X_0) + phi(X^(0)) -
  # J(X^(0)) with coef = A[:, 0]. The updates' factors r_i reach the read as J(r_i).
  coef = since = beta  # since: the retention product from the read's base to each token
  aligned = keep_base is None
  w0, w0_scale, G_read = x, None, G
  read_mats, read_scales = mats, scales          # phi of the read's base (J below)
  if rule.reads_linearised:
    # at the base (aligned: X_0 itself, pb = 1) the linearised weights are phi(X_0) exactly
    if aligned:
      w0, w0_scale = mats, scales
    else:
      w0 = rule.read_weights(x, xb, pb, c_L, phi_base=full(mats, scales))
  if lag:
    x1 = tuple((beta[0] * x[l] if s is None else beta[0] * x[l] + f[0] * s[l])
               - jnp.outer(G[l][0, 0] * gs[l][0], rs[l][0]) for l in range(L))  # token 0's step
    base = x1 if aligned else tuple(jnp.where(keep_base, b_, x_) for b_, x_ in zip(xb, x1))
    read_mats, read_scales = rule.phi_factored(base, c_L)
    rs1, gs1 = grad_factors(rule, read_mats, ln_s, ln_b, tok.k[1:], tok.v[1:],
                            None if tok.delta is None else tok.delta[1:], read_scales)
    rs = tuple(jnp.concatenate([r0, r1]) for r0, r1 in zip(rs, rs1))
    gs = tuple(jnp.concatenate([g0, g1]) for g0, g1 in zip(gs, gs1))
    since = segment_products(tok.a)[0][:, 0]
    since = since if aligned else jnp.where(keep_base, beta, since)
    if rule.reads_linearised:
      # Token 0 took its step exactly, so the reads start from W0 = phi(X_1) (coef_t = A[t, 0]) and
      # see only the later tokens' updates: the linearisation at X_1 of a_0 X_0 + ..., whose
      # token-0 term cancels, J_1(a_0 X_0 - X_1) = G[0, 0] g_0 J_1(r_0)^T, against column 0 of G.
      # (When keep_base, token 0 is padding: column 0 is zero anyway and W0 stays the carried one.)
      if aligned:
        w0, w0_scale = read_mats, read_scales
      else:
        w0 = tuple(jnp.where(keep_base, w_, p_) for w_, p_ in zip(w0, full(read_mats, read_scales)))
      G_read = [g.at[:, 0].set(0.0) for g in G]
      coef = since
  since_base = pb * since                                     # P_t (equal to pb beta_t without lag)
  col = lambda t: None if t is None else t[:, None]
  ends = ChunkEnds(
      beta_n=beta[-1], f_n=None if s is None else f[-1], mom_n=None if s is None else mom[-1],
      g_end=tuple(col(G[l][-1]) for l in range(L)),
      s_end=None if s is None else tuple(col(tok.theta[:, l] * Bm[-1]) for l in range(L)))
  # Dual form over W_t = coef_t W0 + f_t S_0 - sum_i G[t, i] g_i r_i^T (no per-token weights),
  # unless the rule reads phi(X_t) exactly at every token.
  dual = rule.reads_linearised or rule.weights_are_state
  rs_read = None
  if rule.reads_linearised:  # the read sees the updates through J at its base (rules.read_map)
    J = rule.read_map(base, c_L, factored=(read_mats, read_scales))  # phi(base), computed above
    rs_read = tuple(J[l](rs[l]) for l in range(L))
  y, x_new, s_new = read_and_carry(XLA_OPS, tok.q if dual else None, rs, gs, G_read, w0, col(coef),
                                   col(f), x, s, ends, ln_s, ln_b, rs_read=rs_read,
                                   w0_scale=w0_scale)
  if not dual:  # exact_read: per-token states X_t for the whole chunk, read with phi(X_t)
    xs_t = tuple((beta[:, None, None] * x[l][None] if s is None else
                  beta[:, None, None] * x[l][None] + f[:, None, None] * s[l][None])
                 - _mm("ts,so,si->toi", G[l], gs[l], rs[l]) for l in range(L))
    y = mlp_apply(rule.phi(xs_t, c_L), ln_s[None], ln_b[None], tok.q[:, None, :])[:, 0]
  y_prev = (None if tok.q_prev is None else
            mlp_apply(mats, ln_s, ln_b, tok.q_prev[None], scales)[0])
  return ChunkOut(y, x_new, s_new, base, since_base[-1], y_prev)


def memory_xla(rule, inputs: MemoryInputs, params: MemoryParams, state: MemoryState, *,
               chunk_size, lengths=None, reset: MemoryState | None = None, assume_aligned=False,
               chunk_fn=None, hand_vjp=True):
  """The chunked engine; same arguments and result as `reference.memory_reference`.

  `assume_aligned=True` is the caller's promise that every row starts at a chunk boundary
  (phase 0, e.g. a fresh training sequence): the phase shift and its extra chunk are skipped.
  `chunk_fn(carry, tokens, params, keep)` (optional) replaces the vmapped `chunk_step` of one chunk
  for all (batch row, head): `engine.ChunkCarry` and `engine.ChunkTokens` batched [B, H, ...]
  (the mask m [B, n]), params [H, ...], keep [B]; returns a batched `engine.ChunkOut`. The scan,
  checkpointing, phase shift, masks and carry stay as they are (e.g. the Pallas kernel of
  `pallas_gpu.py`). Without one, the Titans rule at depth 1 or 2 runs `titans_chunk_fn` (the
  hand-written VJP) unless `hand_vjp=False`, which differentiates `chunk_step` like every other
  rule (a check).
  Resets (inputs.resets, `reset`) as in the oracle, but every reset must start a chunk of the global
  grid (phase + t a multiple of b; `layers.packing` moves packed documents there): the chunk then
  starts from `reset`. A reset anywhere else makes every output NaN rather than silently wrong.
  """
  q, k, v, theta, a, eta, delta, resets = inputs
  B, T, H, D = q.shape
  b = chunk_size
  dt = compute_dtype(inputs, params.ln_scale, params.ln_bias, state.x, state.s, state.base)
  nc = -(-T // b) if assume_aligned else -(-(T + b - 1) // b)
  tp = nc * b
  phase0 = jnp.zeros((B,), jnp.int32) if assume_aligned else state.phase.astype(jnp.int32)
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

  tokens = ChunkTokens(
      q=chunks(shift(q, 0.0)), k=chunks(shift(k, 0.0)), v=chunks(shift(v, 0.0)),
      theta=chunks(shift(jnp.where(real[..., None, None], theta, 0), 0.0)),
      a=gate(a, 1.0), eta=gate(eta, 1.0), delta=gate(delta, 1.0),
      m=jnp.moveaxis(shift(real, 0.0).reshape(B, nc, b), 1, 0))   # [nc, B, b]
  if resets is not None:
    r_bc = shift(resets & real, 0.0).reshape(B, nc, b) > 0
    misplaced = jnp.any(r_bc[:, :, 1:])
    resets_c = jnp.moveaxis(r_bc[:, :, 0], 1, 0)               # [nc, B]: chunk c starts a document
  prm = jax.tree.map(lambda t: t.astype(dt), params)
  cast = lambda xs: None if xs is None else tuple(t.astype(dt) for t in xs)
  x0, s0, xb0 = cast(state.x), cast(state.s), cast(state.base)
  pb0 = jnp.ones((B, H), dt) if state.base_decay is None else state.base_decay.astype(dt)
  if resets is not None:
    r_x, r_s = cast(reset.x), cast(reset.s)
  c_last = (phase0 + n_real - 1) // b                 # chunk of the last real token (-1: none)
  lag = rule.lag_token and b > 1
  if chunk_fn is None and hand_vjp and rule == TITANS and len(state.x) <= 2:
    chunk_fn = titans_chunk_fn
  # heads share the row's mask and lag flag; batch rows share the params (LayerNorm, KL scale)
  step = functools.partial(chunk_step, dataclasses.replace(rule, lag_token=lag))
  lin = rule.reads_linearised
  if lin:  # each chunk also gets the previous chunk's last query (chunk_step: q_prev)
    q_last = tokens.q[:, :, :, -1]                             # [nc, B, H, D]
    tokens = tokens._replace(q_prev=jnp.concatenate([jnp.zeros_like(q_last[:1]), q_last[:-1]]))
  head_tokens = jax.tree.map(lambda _: 0, tokens)._replace(m=None)   # the mask is per row
  step_bh = jax.vmap(jax.vmap(step, in_axes=(0, head_tokens, 0, None)), in_axes=(0, 0, None, 0))

  @jax.checkpoint
  def compute(x, s, first, tok_c):
    first = jnp.broadcast_to(first, (B,))
    if assume_aligned:  # every chunk starts at its base (phase 0: the base is the state)
      xb, pb, keep = x, jnp.ones((B, H), dt), None
    else:
      xb = tuple(jnp.where(first[:, None, None, None], b0, x_) for b0, x_ in zip(xb0, x))
      pb = jnp.where(first[:, None], pb0, 1.0)                  # [B, H]
      keep = first & (phase0 > 0)                              # [B]
    return (step_bh if chunk_fn is None else chunk_fn)(ChunkCarry(x, s, xb, pb), tok_c, prm, keep)

  def end_read(x, q_BHD):
    """M_{phi(X)}(q) for one query per (row, head): the read of a chunk-ending token."""
    w = rule.phi(x, None if prm.kl_scale is None else prm.kl_scale[None])
    return mlp_apply(w, prm.ln_scale[None], prm.ln_bias[None], q_BHD[:, :, None, :])[:, :, 0]

  def body(carry, inp):
    x, s, sel, pb_sel = carry
    c, tok_c, *r = inp
    first = c == 0
    if resets is not None:  # a document starts here: the chunk runs from the reset state, as alone
      r = r[0]
      rf = r.astype(dt)[:, None, None, None]
      rb = lambda n, o: n * rf + o * (1 - rf)   # a 0/1 blend, like `sel` below
      x_pre = x
      x = tuple(map(rb, r_x, x))
      s = None if s is None else tuple(map(rb, r_s, s))
      first = first & ~r
    out = compute(x, s, first, tok_c)
    y = out.y
    if lin:
      y_prev = out.y_prev
      if resets is not None:
        # the previous chunk's last token reads phi of ITS end state, not of the reset state
        y_prev = jnp.where(r[:, None, None], end_read(x_pre, tok_c.q_prev), y_prev)
      y = (y, y_prev)
    # A 0/1 blend instead of jnp.where: the backward then keeps a [B] flag per chunk, not a
    # predicate broadcast to |W|; with h in {0, 1} the blend is exact.
    h = (c == c_last).astype(dt)
    sel = tuple(b_ * h[:, None, None, None] + o * (1 - h[:, None, None, None])
                for b_, o in zip(out.base, sel))
    return (out.x, out.s, sel, out.since_base * h[:, None] + pb_sel * (1 - h[:, None])), y

  # Titans over a few chunks (CPU-sized training, MAC segments, decode steps) is unrolled: the
  # while loop's per-iteration overhead dominated there. Without momentum (Miras) the rolled loop
  # is as fast and XLA does not keep every unrolled chunk's recomputed temporaries alive at once
  # (docs/results.md, Miras step cost).
  unroll = nc if nc <= 4 and rule.momentum else 1
  scanned = (jnp.arange(nc), tokens) + (() if resets is None else (resets_c,))
  (x_end, s_end, sel, pb_sel), y = lax.scan(body, (x0, s0, xb0, pb0), scanned, unroll=unroll)
  if lin:
    # Token b-1 of every chunk ends it and reads phi(X_n): chunk c + 1 read it (chunk_step's
    # q_prev); the last chunk's reads phi(X_n) of the final state here. Only real tokens are set.
    y, y_prev = y
    y_last = end_read(x_end, q_last[-1])                       # [B, H, D]
    y_ends = jnp.concatenate([y_prev[1:], y_last[None]])       # [nc, B, H, D]
    ends_real = tokens.m[:, :, -1] > 0                         # [nc, B]
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
    w_end = rule.read_weights(x_end, base, base_decay,
                              None if prm.kl_scale is None else prm.kl_scale[None])
    o_end = memory_apply(w_end, prm.ln_scale, prm.ln_bias, q)
    o = jnp.where(real[:, :, None, None], o, o_end)
  if resets is not None:
    o = jnp.where(misplaced, jnp.nan, o)
  return o.astype(q.dtype), MemoryState(x_end, s_end, base, phase, base_decay)
