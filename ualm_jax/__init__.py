"""ualm-jax: train UALM-style unified audio language models with JAX."""

__version__ = "0.1.0"
