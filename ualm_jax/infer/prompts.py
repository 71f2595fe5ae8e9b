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
def read_prompts(path: str | os.PathLike, need: str = "prompt", out_name: str | None = None,
                 out_dir: str | os.PathLike | None = None) -> list[dict]:
    """The JSON lines of a prompts file, one object per line; blank lines are skipped, each row
    keeps its line number as `_line`. Every line needs a non-empty `need` string ("prompt", or
    "audio" for captioning); an `audio` path relative to the file is resolved against its folder.
    With `out_name` (e.g. "sample_{:04d}.wav", numbered by row) each row's `out` (default
    out_name) is resolved inside `out_dir`, else inside the file's folder; an absolute `out`, one
    that leaves that folder and two rows writing one file are refused. Errors name file and line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    here = Path(path).parent
    base = Path(out_dir) if out_dir else here
    rows, seen = [], {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get(need), str) or not row[need].strip():
            raise ValueError(f"{where}: needs a {need!r} string (non-empty)")
        if isinstance(row.get("audio"), str) and not os.path.isabs(row["audio"]):
            row["audio"] = str(here / row["audio"])
        if out_name is not None:
            row["out"] = str(base / _out_path(row.get("out", out_name.format(len(rows))), where,
                                              base, seen, n))
        rows.append({**row, "_line": n})
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def _out_path(out, where: str, base: Path, seen: dict, n: int) -> str:
    """A row's `out`, normalised; refused when it is not a relative path inside `base` or when an
    earlier row (seen: path -> line) writes it too."""
    if not isinstance(out, str) or not out.strip():
        raise ValueError(f"{where}: out={out!r} must be a non-empty file name")
    norm = os.path.normpath(out)
    if os.path.isabs(out):
        raise ValueError(f"{where}: out={out!r} is absolute; give a path inside {base} "
                         "(the --out-dir, default the prompts file's folder)")
    if norm in (".", "..") or norm.startswith(".." + os.sep):
        raise ValueError(f"{where}: out={out!r} leaves {base} (the --out-dir, default the "
                         "prompts file's folder)")
    if norm in seen:
        raise ValueError(f"{where}: out={out!r} is also written by line {seen[norm]}")
    seen[norm] = n
    return norm


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
