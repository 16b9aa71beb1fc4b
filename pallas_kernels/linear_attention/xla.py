"""Chunked (gated) linear attention in plain JAX: the gated-delta-rule chunk scan with V' = V
(docs/architectures/gated_deltanet.md: linear attention skips steps 3-6); chunk body under
jax.checkpoint, so backprop keeps chunk-boundary states only."""
from __future__ import annotations

from pallas_kernels.gated_delta_rule.xla import recurrence_xla


def linear_attention_xla(q, k, v, g=None, *, scale=None, initial_state=None, segment_ids=None,
                         chunk_size=64):
  return recurrence_xla(q, k, v, None, g, scale=scale, initial_state=initial_state,
                        segment_ids=segment_ids, chunk_size=chunk_size, delta=False)
