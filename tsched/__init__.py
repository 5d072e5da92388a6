"""tsched: temporal scheduling of token-level credit allocation for RLVR, in JAX/Flax."""
