"""`ualm bench data`: packed tokens/s through the whole Grain pipeline (read, render, mix, pack).

Runs on built shards (`paths`: task name -> built dataset directory, opened with
data_pipelines.build.open_source) or on in-memory records. `synthetic_records` makes records with
realistic UALM shapes (10 s t2a clips = 500 codec frames, 10 s captioning input = 1000 mel
frames, text SFT turns) for benchmarks and tests; record r of a task carries r in its first two
user-text ids so tests can trace where every example went.
"""
from __future__ import annotations

import time
from typing import Mapping, Optional

import numpy as np

from ualm_jax.format.records import to_record
from ualm_jax.format.template import Segment
from ualm_jax.format.vocab import JointVocab

# Per kind: (prompt text ids, answer text ids, codec frames, mel frames) ranges [lo, hi).
SHAPES = {
    "t2a": {"prompt": (12, 40), "codes": (250, 501)},
    "caption": {"prompt": (8, 14), "mel": (500, 1001), "answer": (8, 40)},
    "text": {"prompt": (20, 200), "answer": (20, 400)},
}


def record_id(text_ids, text_vocab_size: int) -> int:
    """Inverse of the id stamp `synthetic_records` puts in the first two user-text ids."""
    return int(text_ids[0]) * text_vocab_size + int(text_ids[1])


def synthetic_records(kind: str, n: int, vocab: JointVocab, n_mels: int = 128, seed: int = 0,
                      shapes: Optional[Mapping] = None, task: Optional[str] = None) -> list:
    """n stored records of one kind: "t2a" (text -> codes), "caption" (text + encoder mel ->
    text) or "text" (text -> text). shapes overrides SHAPES[kind] ranges."""
    if kind not in SHAPES:
        raise ValueError(f"kind must be one of {', '.join(SHAPES)}, got {kind!r}")
    shape = {**SHAPES[kind], **(shapes or {})}
    rng = np.random.default_rng(seed)
    v, k = vocab.text_vocab_size, vocab.num_codebooks
    out = []
    for r in range(n):
        def text(key, stamp=False):
            ids = rng.integers(0, v, int(rng.integers(*shape[key])))
            if stamp:
                ids = np.concatenate([[r // v % v, r % v], ids])
            return ids.astype(np.int32)

        mels = []
        if kind == "t2a":
            t = int(rng.integers(*shape["codes"]))
            segs = [Segment("user", "text", text("prompt", True)),
                    Segment("assistant", "audio", rng.integers(0, vocab.codebook_size, (t, k)))]
        elif kind == "caption":
            m = int(rng.integers(*shape["mel"]))
            mels.append(rng.standard_normal((m, n_mels)).astype(np.float16))
            segs = [Segment("user", "text", text("prompt", True)), Segment("user", "audio", m),
                    Segment("assistant", "text", text("answer"))]
        else:
            segs = [Segment("user", "text", text("prompt", True)),
                    Segment("assistant", "text", text("answer"))]
        out.append(to_record(task or kind, segs, mels, num_codebooks=k, n_mels=n_mels))
    return out


def _open_paths(paths: Mapping[str, str], split: str) -> dict:
    from data_pipelines import build  # the builders' module; imported only for built shards

    return {name: build.open_source(path, split) for name, path in paths.items()}


def bench_data(sources: Optional[Mapping] = None, paths: Optional[Mapping[str, str]] = None,
               mixture: Optional[list] = None, vocab: Optional[JointVocab] = None,
               batch_size: int = 8, seq_len: int = 4096, n_mels: int = 128,
               mel_frames: int = 3000, frames_per_window: int = 750, max_clips_per_row: int = 4,
               cfg_dropout: float = 0.05, seconds: float = 5.0, warmup_batches: int = 3, seed: int = 0,
               split: str = "train", records_per_task: int = 2000,
               lookahead: Optional[int] = None, shapes: Optional[Mapping] = None) -> dict:
    """Packed tokens/s (non-pad positions) and rows/s, warm-up excluded.

    sources / paths: task -> random-access source, or -> built dataset directory. With neither,
    synthetic records of the three UALM kinds are made (records_per_task each) with the paper's
    token blend; shapes: kind -> SHAPES overrides for them. mixture: `data.mixture` entries
    (default: every task, share 1).
    """
    from data_pipelines.grain_pipeline import make_iterator, packing_efficiency

    vocab = vocab or JointVocab(text_vocab_size=151936, num_codebooks=8, codebook_size=1024)
    if sources is None and paths:
        sources = _open_paths(paths, split)
    if sources is None:
        shapes = shapes or {}
        sources = {kind: synthetic_records(kind, records_per_task, vocab, n_mels, seed=i,
                                           shapes=shapes.get(kind))
                   for i, kind in enumerate(SHAPES)}
        mixture = mixture or [{"name": "caption", "share": 0.277},
                              {"name": "t2a", "share": 0.331 / 2, "upsample": 2.0},
                              {"name": "text", "share": 0.392}]
    mixture = mixture or [{"name": name, "share": 1.0} for name in sources]
    cfg = {"mixture": mixture, "cfg_dropout": cfg_dropout, "max_clips_per_row": max_clips_per_row}
    t0 = time.perf_counter()
    it = make_iterator(sources, cfg, vocab, batch_size, seq_len, seed, n_mels, mel_frames,
                       frames_per_window, split=split, lookahead=lookahead)
    setup_s = time.perf_counter() - t0
    for _ in range(warmup_batches):
        next(it)
    tokens = rows = batches = 0
    eff = []
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < seconds or batches == 0:
        b = next(it)
        tokens += int((b["segment_ids"] > 0).sum())
        rows += b["segment_ids"].shape[0]
        eff.append(packing_efficiency(b))
        batches += 1
    dt = time.perf_counter() - t1
    return {"bench": "data", "batch": batch_size, "seq": seq_len, "tasks": list(sources),
            "batches": batches, "seconds": dt,
            "packed_tokens_per_s": tokens / dt, "positions_per_s": rows * seq_len / dt,
            "batches_per_s": batches / dt, "packing_efficiency": float(np.mean(eff)),
            "setup_s": setup_s, **{f"counts_{k}": v for k, v in it.stats().items()}}


def bench_data_from_config(cfg, seconds: float = 5.0, split: str = "train") -> dict:
    """bench_data over a config's `data.mixture` (its built shards), model vocab, audio window,
    batch and sequence length: the pipeline exactly as `ualm train` would run it on one host."""
    from data_pipelines.grain_pipeline import audio_args
    from data_pipelines.mixture import parse_mixture

    entries = parse_mixture(cfg.data.mixture)
    audio = audio_args(cfg.model)
    return bench_data(paths={e.name: e.path for e in entries},
                      mixture=[{"name": e.name, "share": e.share, "upsample": e.upsample}
                               for e in entries],
                      vocab=JointVocab.from_model_config(cfg.model),
                      batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                      max_clips_per_row=cfg.data.max_clips_per_row,
                      cfg_dropout=cfg.data.cfg_dropout, seconds=seconds, seed=cfg.seed, split=split, **audio)


if __name__ == "__main__":
    import json

    print(json.dumps(bench_data()))
