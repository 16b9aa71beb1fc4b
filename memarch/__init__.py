"""memarch: memory-augmented sequence architectures in JAX/Flax NNX."""
