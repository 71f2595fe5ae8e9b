"""MusicGen's delay pattern: codebook k is shifted right by k frames.

A clip of T frames becomes T+K-1 positions; empty slots hold that codebook's pad id (and are
supervised). Revert takes codes[k : k+T, k].
"""
from __future__ import annotations

import numpy as np


def apply_delay(ids: np.ndarray, pad_ids: np.ndarray) -> np.ndarray:
    """ids [T, K] (joint ids) -> [T+K-1, K] with codebook k delayed by k frames."""
    ids = np.asarray(ids)
    t, k = ids.shape
    out = np.tile(np.asarray(pad_ids, ids.dtype)[None, :], (t + k - 1, 1))
    for j in range(k):
        out[j:j + t, j] = ids[:, j]
    return out


def revert_delay(delayed: np.ndarray) -> np.ndarray:
    """[T+K-1, K] -> [T, K]."""
    delayed = np.asarray(delayed)
    n, k = delayed.shape
    t = n - k + 1
    if t < 0:
        raise ValueError(f"a delayed clip of {k} codebooks needs >= {k - 1} positions, got {n}")
    return np.stack([delayed[j:j + t, j] for j in range(k)], axis=1)
