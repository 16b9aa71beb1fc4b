"""Kernel ops of memarch: pure JAX, no Flax. One folder per op; see DESIGN.md section 6."""
