"""The YAML presets, installed as package data (found by name: ualm_jax/config.py config_path)."""
