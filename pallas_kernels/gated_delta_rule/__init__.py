"""Gated delta rule (Gated DeltaNet, Yang, Kautz, Hatamizadeh, ICLR 2025, eq. 10).

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,    o_t = scale * S_t^T q_t

One op, several implementations (docs/design.md, "Kernel ops"): `reference` (token lax.scan, the
oracle), `xla` (chunked WY/UT form, the portable default), `pallas_gpu` (Triton-lowered
`pallas_call`) and `pallas_tpu` (Mosaic). The maths: docs/architectures/gated_deltanet.md.
"""
from __future__ import annotations

from pallas_kernels._dispatch import dispatch, lazy
from pallas_kernels.gated_delta_rule import _common
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference
from pallas_kernels.gated_delta_rule.xla import gated_delta_rule_xla

IMPLEMENTATIONS = {
    "reference": gated_delta_rule_reference,
    "xla": gated_delta_rule_xla,
    "pallas_gpu": lazy("pallas_kernels.gated_delta_rule.pallas_gpu",
                       "gated_delta_rule_pallas_gpu"),
    "pallas_tpu": lazy("pallas_kernels.gated_delta_rule.pallas_tpu",
                       "gated_delta_rule_pallas_tpu"),
}


def gated_delta_rule(q, k, v, beta, g, *, scale=None, initial_state=None, segment_ids=None,
                     chunk_size=64, implementation=None, interpret=False):
  """Gated delta rule over a sequence; returns (o [B, T, H, V] in q's dtype, final_state [B, H, K, V]).

  Args:
    q, k: [B, T, H, K]. Not normalised here (Gated DeltaNet L2-normalises them in the layer).
    v: [B, T, H, V].
    beta: [B, T, H] write strengths in (0, 1).
    g: [B, T, H] log decay, <= 0 (alpha_t = exp(g_t)).
    scale: read-out scale; K**-0.5 when None.
    initial_state: [B, H, K, V] (any float dtype; computed in float32) or None for zeros.
    segment_ids: [B, T] ints; the state resets to zero where the id changes from the previous token
      (the first token of the call continues from initial_state).
    chunk_size: chunk length of the chunked paths (T need not be a multiple).
    implementation: None (best for the backend, falling back to xla), "reference", "xla",
      "pallas_gpu" or "pallas_tpu".
    interpret: run a Pallas path in interpret mode (CPU tests).
  Returns: o, and the final state in float32 (float64 for float64 inputs).
  """
  _common.check_inputs("gated_delta_rule", q, k, v, beta, g, initial_state, segment_ids, chunk_size,
                       needs_beta=True)
  return dispatch("gated_delta_rule", IMPLEMENTATIONS, implementation, interpret, q, k, v, beta, g,
                  scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                  chunk_size=chunk_size)
