"""Recipes composed from inference and evaluation (DPO pair mining)."""
