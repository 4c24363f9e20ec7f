"""AlpaCare-JAX: instruction-tuning LLaMA-family models for medicine in JAX."""

__version__ = "0.1.0"
