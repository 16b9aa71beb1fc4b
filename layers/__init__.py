"""Flax NNX layers of memarch: one file per paper plus shared building blocks (DESIGN.md section 1)."""
