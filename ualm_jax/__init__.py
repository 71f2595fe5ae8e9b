"""ualm-jax: train UALM-style unified audio language models with JAX.

`ualm_jax.load(checkpoint)` gives a trained model as an object (ualm_jax/api.py)."""

__version__ = "0.1.0"


def load(checkpoint, tokenizer=None, codec=None, overrides=()):
    """A checkpoint ready to generate (see ualm_jax/api.py; imported on first use so that
    `import ualm_jax` stays light)."""
    from ualm_jax.api import load as _load

    return _load(checkpoint, tokenizer, codec, overrides)
