"""(Gated) linear attention: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

Same contract and implementations as `gated_delta_rule` (docs/architectures/gated_deltanet.md); g is
optional (None: ungated linear attention, Katharopoulos et al. 2020).
"""
from __future__ import annotations

from pallas_kernels._dispatch import dispatch, lazy
from pallas_kernels.gated_delta_rule import _common
from pallas_kernels.linear_attention.reference import linear_attention_reference
from pallas_kernels.linear_attention.xla import linear_attention_xla

IMPLEMENTATIONS = {
    "reference": linear_attention_reference,
    "xla": linear_attention_xla,
    "pallas_gpu": lazy("pallas_kernels.linear_attention.pallas_gpu", "linear_attention_pallas_gpu"),
    "pallas_tpu": lazy("pallas_kernels.linear_attention.pallas_tpu", "linear_attention_pallas_tpu"),
}


def linear_attention(q, k, v, g=None, *, scale=None, initial_state=None, segment_ids=None,
                     chunk_size=64, implementation=None, interpret=False):
  """(Gated) linear attention; returns (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] f32).

  q, k: [B, T, H, K]; v: [B, T, H, V]; g: optional [B, T, H] log decay (<= 0); the other arguments
  are those of `gated_delta_rule`.
  """
  _common.check_inputs("linear_attention", q, k, v, None, g, initial_state, segment_ids, chunk_size,
                       needs_beta=False)
  return dispatch("linear_attention", IMPLEMENTATIONS, implementation, interpret, q, k, v, g,
                  scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                  chunk_size=chunk_size)
