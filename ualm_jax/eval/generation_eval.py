"""Text-to-audio metrics in the stable-audio-metrics style, with swappable models.

    FD   : Frechet distance between embeddings of generated and reference audio (paper: OpenL3).
    CLAP : mean cosine of CLAP(generated audio) and CLAP(its caption) (paper: LAION-CLAP).
    KL   : paired KL between tagger outputs on generated and reference audio (paper: PaSST);
           direction KL(generated || reference), see metrics.KL_DIRECTION.
Each result names the model that produced it; a metric whose model is not given is skipped.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ualm_jax.eval.embedders import AudioEmbedder, peak_normalise
from ualm_jax.eval.metrics import (KL_DIRECTION, MetricResult, clap_cosines, frechet_distance,
                                   kl_divergence)


def _tag(tagger, waves, sr) -> tuple[np.ndarray, str]:
    """A tagger gives `logits(waves, sr)` (preferred: softmax after pooling, as PaSST KL does)
    or `probs(waves, sr)`; either way [N, C]."""
    if hasattr(tagger, "logits"):
        return tagger.logits(waves, sr), "logits"
    return tagger.probs(waves, sr), "probs"


def _fd_embeddings(embedder: AudioEmbedder, waves, sr, frames: bool) -> np.ndarray:
    if frames:  # OpenL3-style: every frame is one sample of the distribution
        return np.concatenate(embedder.embed_frames(waves, sr))
    return embedder.embed_audio(waves, sr)


def _normaliser(peak_db):
    if peak_db is None:
        return lambda ws: [np.asarray(w, np.float32) for w in ws]
    return lambda ws: [peak_normalise(np.asarray(w, np.float32), peak_db) for w in ws]


def clip_features(gen_waves: Sequence[np.ndarray], gen_sr: int,
                  captions: Sequence[str] | None = None, *, embedder: AudioEmbedder | None = None,
                  clap: AudioEmbedder | None = None, fd_frames: bool = False,
                  peak_db: float | None = -1.0) -> dict:
    """The per-clip parts of FD and CLAP (arrays that distributed.allgather_json can pool from
    processes that each generated some clips): {"fd_rows": embedding rows, "clap": one cosine per
    clip}, for the models given.
    merge_features turns the pooled parts into the metrics evaluate_generation reports."""
    gen = _normaliser(peak_db)(gen_waves)
    out: dict = {}
    if embedder is not None:
        out["fd_rows"] = _fd_embeddings(embedder, gen, gen_sr, fd_frames) if gen else []
    if clap is not None and captions is not None:
        if len(captions) != len(gen):
            raise ValueError(f"{len(captions)} captions for {len(gen)} generated clips")
        out["clap"] = clap_cosines(clap.embed_audio(gen, gen_sr),
                                   clap.embed_text(list(captions))) if gen else []
    return out


def merge_features(parts: Sequence[dict], n: int, ref_waves=None, ref_sr: int | None = None, *,
                   embedder: AudioEmbedder | None = None, clap: AudioEmbedder | None = None,
                   fd_frames: bool = False, peak_db: float | None = -1.0) -> dict[str, MetricResult]:
    """FD (generated rows of every part against the references) and CLAP (the mean of every
    clip's cosine) from clip_features of all the clips, split over any number of parts."""
    results: dict[str, MetricResult] = {}
    if embedder is not None and ref_waves is not None:
        emb_gen = np.asarray([r for p in parts for r in p.get("fd_rows", [])], np.float64)
        ref = _normaliser(peak_db)(ref_waves)
        emb_ref = _fd_embeddings(embedder, ref, ref_sr, fd_frames)
        results["fd"] = MetricResult(frechet_distance(emb_gen, emb_ref), n=n, model=embedder.name,
                                     details={"n_ref": len(ref), "rows_gen": len(emb_gen),
                                              "rows_ref": len(emb_ref), "frames": fd_frames})
    cos = [c for p in parts for c in p.get("clap", [])]
    if clap is not None and cos:
        results["clap"] = MetricResult(float(np.mean(cos)), n=len(cos), model=clap.name)
    return results


def evaluate_generation(gen_waves: Sequence[np.ndarray], gen_sr: int,
                        ref_waves: Sequence[np.ndarray] | None, ref_sr: int | None,
                        captions: Sequence[str] | None = None, *,
                        embedder: AudioEmbedder | None = None, clap: AudioEmbedder | None = None,
                        tagger=None, kl_kind: str = "softmax", fd_frames: bool = False,
                        peak_db: float | None = -1.0) -> dict[str, MetricResult]:
    """Metrics for generated clips against references (paired by index for KL).

    embedder:  FD model (`embed_audio`; with fd_frames, `embed_frames` and frame-level FD).
    clap:      joint audio-text embedder for the CLAP score; needs captions[i] for gen_waves[i].
    tagger:    class-output model for KL; needs ref_waves[i] paired with gen_waves[i].
    peak_db:   every clip is peak-normalised to this level first (stable-audio-metrics: -1 dB);
               None leaves levels alone.
    Returns {"fd", "clap", "kl"} -> MetricResult, for the models given.
    """
    part = clip_features(gen_waves, gen_sr, captions,
                         embedder=embedder if ref_waves is not None else None, clap=clap,
                         fd_frames=fd_frames, peak_db=peak_db)
    results = merge_features([part], len(gen_waves), ref_waves, ref_sr, embedder=embedder,
                             clap=clap if captions is not None else None, fd_frames=fd_frames,
                             peak_db=peak_db)
    if tagger is not None and ref_waves is not None:  # the clips as the other metrics saw them
        gen, ref = _normaliser(peak_db)(gen_waves), _normaliser(peak_db)(ref_waves)
        if len(ref) != len(gen):
            raise ValueError(f"KL pairs clips by index: {len(gen)} generated vs {len(ref)} references")
        out_gen, inputs = _tag(tagger, gen, gen_sr)
        out_ref, _ = _tag(tagger, ref, ref_sr)
        kl = kl_divergence(out_ref, out_gen, kind=kl_kind, inputs=inputs)
        results["kl"] = MetricResult(kl["kl"], n=len(gen), model=getattr(tagger, "name", type(tagger).__name__),
                                     details={"direction": KL_DIRECTION, "kind": kl_kind,
                                              "kl_ref_gen": kl["kl_ref_gen"]})
    return results
