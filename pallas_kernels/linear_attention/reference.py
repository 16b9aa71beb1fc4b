"""Token-by-token oracle for (gated) linear attention.

Linear attention (Katharopoulos et al. 2020, arXiv 2006.16236) with an optional scalar gate
(Mamba2-SSD / simple GLA / RetNet family; docs/architectures/gated_deltanet.md):
    S_t = exp(g_t) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t.
Shares the scan of the gated delta rule with the delta correction switched off.
"""
from __future__ import annotations

from pallas_kernels.gated_delta_rule.reference import recurrence_reference


def linear_attention_reference(q, k, v, g=None, *, scale=None, initial_state=None,
                               segment_ids=None, chunk_size=None):
  del chunk_size
  return recurrence_reference(q, k, v, None, g, scale=scale, initial_state=initial_state,
                              segment_ids=segment_ids, delta=False)
