"""Block-retrieval attention: attention over local keys plus the top-k of N key blocks, each block's
contribution gated by its block score (docs/architectures/landmark.md, "The block-retrieval op").

  o = block_retrieval_attention(q [B,Tq,H,d], blk_k [B,N,C,H,d], blk_v [B,N,C,H,dv],
                                gate [B,Tq,Hg,N] (Hg in {1, H}), allowed bool[B,Tq,N], *,
                                always=None, k=None, share='token_head', local=None,
                                blk_mask=None, scale=None, chunk_size=128, implementation=None,
                                far=None)

Semantics, for query i and head h (s_ij = scale * q_i . k_j, scale = d^-1/2 by default):
  S_i   = top-k of the allowed blocks by gate (ties: lower index), plus the `always` blocks
          (these do not count towards k) [ours: the W always-visible recent blocks of our
          landmark attention, docs/architectures/landmark.md]; k=None selects every allowed block.
  e_ij  = gate_ib + s_ij - LSE_{j' in b} s_ij'   for j in block b in S_i (valid keys only)
  e_ij  = s_ij                                   for local key j with mask_loc[i, j]
  o_i   = softmax_j(e_i) . V                     a row with nothing visible returns 0.
`far=(q_far [B,Tq,H,d], blk_k_far [B,N,C,H,d])` scores the blocks that are not `always` for a query
with s_ij = scale * q_far_i . k_far_j instead (the local keys and the `always` blocks keep q and
blk_k); the caller passes the matching gate. This is how landmark attention's `positions='stingy'`
gives retrieved blocks their own RoPE positions (docs/architectures/landmark.md) [ours].
Block b's total probability is exp(gate_ib) / Z_i: the gate competes with the local keys and
gates its block, which is landmark attention's grouped softmax (Mohtashami & Jaggi 2023, Eq. 1-4)
when `local` is the own block and gate = s_{i, landmark(b)}, and HCAM's renormalised top-k chunk
attention (Lampinen et al. 2021, §2) when local=None (per-head outputs share the chunk weights
w_qc).

`share`: 'token_head' selects per query and head; 'token' shares one selection over the heads of a
query (max over heads of the normalised probabilities softmax_b(gate)); with Hg = 1 both agree.
`blk_mask` marks valid keys inside blocks (True = valid). Gradients flow to q, blk_k, blk_v, gate
and the local keys/values; the selection itself is discrete. Output in q's dtype; logits and
softmax in float32 (float64 for float64 inputs).

Implementations: `reference` (dense masked, the oracle), `xla` (query-tiled, checkpointed tile
body), `pallas_gpu` (Triton: flash-style training kernels whose KV tile is one block, forward and
backward, and a decode kernel that reads only each row's selected blocks; see `pallas_gpu.py`) and
`pallas_tpu` (Mosaic; see `pallas_tpu.py`). `implementation=None` picks the Pallas kernel of the
backend (GPU, TPU) and `xla` elsewhere, falling back to `xla` where a kernel raises
NotImplementedError (float64, head dims or block size > 256, `far` given).
"""
from __future__ import annotations

from pallas_kernels._dispatch import dispatch, lazy
from pallas_kernels.block_retrieval_attention import _common
from pallas_kernels.block_retrieval_attention.reference import block_retrieval_attention_reference
from pallas_kernels.block_retrieval_attention.xla import (
  DEFAULT_CHUNK,
  block_retrieval_attention_xla,
)

IMPLEMENTATIONS = {
    "reference": block_retrieval_attention_reference,
    "xla": block_retrieval_attention_xla,
    "pallas_gpu": lazy("pallas_kernels.block_retrieval_attention.pallas_gpu",
                       "block_retrieval_attention_pallas_gpu"),
    "pallas_tpu": lazy("pallas_kernels.block_retrieval_attention.pallas_tpu",
                       "block_retrieval_attention_pallas_tpu"),
}


def block_retrieval_attention(q, blk_k, blk_v, gate, allowed, *, always=None, k=None,
                              share="token_head", local=None, blk_mask=None, scale=None,
                              chunk_size=DEFAULT_CHUNK, implementation=None, interpret=False,
                              far=None):
  """See the module docstring; returns o [B, Tq, H, dv] in q's dtype.

  chunk_size is the query tile of `xla` and of the Pallas training kernels (rounded to what the
  kernel supports); interpret=True runs a Pallas path in interpret mode (CPU tests).
  """
  _common.check_inputs(q, blk_k, blk_v, gate, allowed, always, k, share, local, blk_mask, far)
  return dispatch("block_retrieval_attention", IMPLEMENTATIONS, implementation, interpret, q, blk_k,
                  blk_v, gate, allowed, always=always, k=k, share=share, local=local,
                  blk_mask=blk_mask, scale=scale, chunk_size=chunk_size,
                  far=None if far is None else tuple(far))
