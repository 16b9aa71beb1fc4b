"""Fused expert gather + weighted sum: the memory reads of PEER, PKM and UltraMemV2
(docs/architectures/peer.md, "The expert read").

  expert_gather(table, indices, weights)            y = sum_k w_k table[i_k]              (PKM)
  expert_mlp(x, down, up, indices, weights, act)    y = sum_k w_k act(down[i_k] . x) up[i_k]
                                                    (PEER: act = GELU; UltraMemV2 pre-values:
                                                     act = identity, w = raw TDQKR scores)

Implementations: `reference` (naive `jnp.take` + einsum, autodiff: the oracle), `xla` (chunked, with
a `jax.custom_vjp` whose table gradients come from sorting the indices and a segment sum, never a dense
[T, K, D] tensor), `pallas_gpu` (Triton kernels: fused gather + weighted sum forward, CSR sorted
segment-sum backward; see `pallas_gpu.py`) and `pallas_tpu` (scalar-prefetched indices, rows DMA'd
from HBM; see `pallas_tpu.py`). `implementation=None` picks `pallas_gpu` on GPU, `pallas_tpu` on TPU
and `xla` elsewhere, and falls back to `xla` for what a kernel does not handle (float64, very wide
rows). `chunk_size` only concerns `xla`.

Tables may stay float32 while activations are bfloat16: rows are cast after the gather, so a huge
table is never copied to the compute dtype [ours]; table gradients come back in the table's dtype.
Leading dims of `indices` / `weights` / `x` are flattened here and restored on the output.
"""
from __future__ import annotations

from pallas_kernels._dispatch import dispatch
from pallas_kernels.expert_gather import _common
from pallas_kernels.expert_gather.reference import expert_gather_reference, expert_mlp_reference
from pallas_kernels.expert_gather.xla import DEFAULT_CHUNK, expert_gather_xla, expert_mlp_xla


def _xla_gather(table, idx, w, *, chunk_size):
  return expert_gather_xla(table, idx, w, chunk_size=chunk_size)


def _ref_gather(table, idx, w, *, chunk_size):
  del chunk_size
  return expert_gather_reference(table, idx, w)


def _xla_mlp(x, down, up, idx, w, *, activation, chunk_size):
  return expert_mlp_xla(x, down, up, idx, w, activation=activation, chunk_size=chunk_size)


def _ref_mlp(x, down, up, idx, w, *, activation, chunk_size):
  del chunk_size
  return expert_mlp_reference(x, down, up, idx, w, activation=activation)


def _gpu_gather(table, idx, w, *, chunk_size, interpret):
  del chunk_size
  from pallas_kernels.expert_gather import pallas_gpu
  return pallas_gpu.expert_gather_pallas_gpu(table, idx, w, interpret=interpret)


def _gpu_mlp(x, down, up, idx, w, *, activation, chunk_size, interpret):
  del chunk_size
  from pallas_kernels.expert_gather import pallas_gpu
  return pallas_gpu.expert_mlp_pallas_gpu(x, down, up, idx, w, activation=activation,
                                          interpret=interpret)


def _tpu_gather(table, idx, w, *, chunk_size, interpret):
  del chunk_size
  from pallas_kernels.expert_gather import pallas_tpu
  return pallas_tpu.expert_gather_pallas_tpu(table, idx, w, interpret=interpret)


def _tpu_mlp(x, down, up, idx, w, *, activation, chunk_size, interpret):
  del chunk_size
  from pallas_kernels.expert_gather import pallas_tpu
  return pallas_tpu.expert_mlp_pallas_tpu(x, down, up, idx, w, activation=activation,
                                          interpret=interpret)


GATHER_IMPLEMENTATIONS = {"reference": _ref_gather, "xla": _xla_gather, "pallas_gpu": _gpu_gather,
                          "pallas_tpu": _tpu_gather}
MLP_IMPLEMENTATIONS = {"reference": _ref_mlp, "xla": _xla_mlp, "pallas_gpu": _gpu_mlp,
                       "pallas_tpu": _tpu_mlp}


def expert_gather(table_ND, indices_TK, weights_TK, *, chunk_size=DEFAULT_CHUNK,
                  implementation=None, interpret=False):
  """y[..., :] = sum_k weights[..., k] * table[indices[..., k]], in weights' dtype.

  Args:
    table_ND: [N, D] rows (float32 parameters are fine with bf16 weights).
    indices_TK: [..., K] integer rows in [0, N). weights_TK: [..., K].
    chunk_size: (token, slot) entries processed at once by `xla` (working set chunk_size x D).
    implementation: None (best for the backend, falling back to xla), "reference", "xla",
      "pallas_gpu" or "pallas_tpu". interpret: run a Pallas path in interpret mode (CPU tests).
  Returns: [..., D].
  """
  _common.check("expert_gather", indices_TK, weights_TK, (table_ND,))
  lead, k = indices_TK.shape[:-1], indices_TK.shape[-1]
  y = dispatch("expert_gather", GATHER_IMPLEMENTATIONS, implementation, interpret, table_ND,
               indices_TK.reshape(-1, k), weights_TK.reshape(-1, k), chunk_size=chunk_size)
  return y.reshape(*lead, table_ND.shape[1])


def expert_mlp(x_TE, down_NE, up_NF, indices_TK, weights_TK, *, activation="gelu",
               chunk_size=DEFAULT_CHUNK, implementation=None, interpret=False):
  """y[...] = sum_k weights[..., k] * act(down[i] . x[...]) * up[i], i = indices[..., k].

  PEER (arXiv:2407.04153 Algorithm 1) with the h heads' selections concatenated along K; UltraMemV2
  (arXiv:2508.18756 Eq. 15-16) with x = W_p x_hat, down = pre-values P, up = values V, act = identity.

  Args:
    x_TE: [..., E] input (the compute dtype). down_NE: [N, E]; up_NF: [N, F].
    indices_TK: [..., K] integer rows; weights_TK: [..., K] router weights.
    activation: "gelu" (exact erf), "relu", "silu" or "identity".
    implementation, interpret: as in `expert_gather`.
  Returns: [..., F] in x's dtype.
  """
  if activation not in _common.ACTIVATIONS:
    raise ValueError(f"expert_mlp: unknown activation {activation!r}; "
                     f"choose one of {tuple(_common.ACTIVATIONS)}")
  _common.check("expert_mlp", indices_TK, weights_TK, (down_NE, up_NF), x=x_TE)
  lead, k = indices_TK.shape[:-1], indices_TK.shape[-1]
  y = dispatch("expert_mlp", MLP_IMPLEMENTATIONS, implementation, interpret,
               x_TE.reshape(-1, x_TE.shape[-1]), down_NE, up_NF, indices_TK.reshape(-1, k),
               weights_TK.reshape(-1, k), activation=activation, chunk_size=chunk_size)
  return y.reshape(*lead, up_NF.shape[1])


__all__ = ["expert_gather", "expert_mlp", "expert_gather_reference", "expert_mlp_reference",
           "expert_gather_xla", "expert_mlp_xla"]
