"""Prompt files (JSON lines) and batched text-to-audio sampling with derived seeds: what
`ualm generate --prompts`, `ualm eval`, the in-loop generation metrics and DPO pair mining share."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from ualm_jax.infer.decode import GenerationConfig
from ualm_jax.infer.tasks import text_to_audio


# Prompts ------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> list[dict]:
    """JSON lines with at least {"prompt": text}; blank lines are ignored, bad ones raise."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not row["prompt"].strip():
            raise ValueError(f"{path}:{n}: each line needs a non-empty \"prompt\" string")
        rows.append({**row, "_line": n})
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


# Generation ---------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 31-bit seed from (seed, sample, batch, ...): distinct streams, never colliding as seed+j
    would across runs."""
    if any(int(p) < 0 for p in parts):
        raise ValueError(f"seeds must be >= 0, got {parts}")
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class Synthesizer:
    """Captions -> codec codes / waveforms, `batch_size` prompts per decode batch (tasks.in_batches:
    fixed rows, so the decoder compiles once per run). Each caption samples with (seed, its uid):
    the same caption, uid and seed give the same clip whatever the batching or process count."""

    def __init__(self, m, gen_cfg: GenerationConfig, batch_size: int = 16):
        if m.codec is None:
            raise ValueError("no codec to decode audio: pass --codec DIR or set data.codec")
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.m, self.gen_cfg, self.batch_size = m, gen_cfg, batch_size

    def codes(self, captions: list[str], seed: int, uids=None) -> list[np.ndarray]:
        """Codes [T, K] per caption; uids default to the captions' indices."""
        cfg = dataclasses.replace(self.gen_cfg, seed=int(seed), batch=self.batch_size)
        return text_to_audio(self.m, list(captions), cfg, uids)

    @property
    def sample_rate(self) -> int:
        return int(self.m.codec.sample_rate)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Float32 mono waveform; empty codes give an empty array."""
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        return np.asarray(self.m.codec.decode(codes), np.float32).reshape(-1)

    def waves(self, captions: list[str], seed: int, uids=None, keep=None) -> list[np.ndarray]:
        """Waveforms; with `keep` (indices), only those are decoded (the others are empty): a
        process of a multi-host job decodes the clips it writes."""
        codes = self.codes(captions, seed, uids)
        return [self.decode(c) if keep is None or i in keep else np.zeros(0, np.float32)
                for i, c in enumerate(codes)]
