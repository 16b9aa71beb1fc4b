"""(Gated) linear attention on the Pallas GPU (Triton) kernel of the gated delta rule with the delta
correction off (V' = V). See gated_delta_rule/pallas_gpu.py."""
from __future__ import annotations

from pallas_kernels.gated_delta_rule.pallas_gpu import recurrence_pallas_gpu


def linear_attention_pallas_gpu(q, k, v, g=None, *, scale=None, initial_state=None,
                                segment_ids=None, chunk_size=64, interpret=False):
  return recurrence_pallas_gpu(q, k, v, None, g, scale=scale, initial_state=initial_state,
                               segment_ids=segment_ids, chunk_size=chunk_size, delta=False,
                               interpret=interpret)
