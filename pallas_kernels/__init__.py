"""Kernel ops of memarch: pure JAX, no Flax. One folder per op; see docs/design.md."""
from pallas_kernels.gated_delta_rule import gated_delta_rule  # noqa: E402,F401
from pallas_kernels.linear_attention import linear_attention  # noqa: E402,F401
