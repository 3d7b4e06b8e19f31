"""CGMQ: Constraint Guided Model Quantization in JAX, Flax and Optax."""
