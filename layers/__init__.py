"""Flax NNX layers of memarch: one file per paper plus shared building blocks (docs/design.md)."""
