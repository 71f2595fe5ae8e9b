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
from ualm_jax.eval.metrics import KL_DIRECTION, MetricResult, clap_score, frechet_distance, kl_divergence


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
    norm = (lambda ws: [peak_normalise(np.asarray(w, np.float32), peak_db) for w in ws]) \
        if peak_db is not None else (lambda ws: [np.asarray(w, np.float32) for w in ws])
    gen = norm(gen_waves)
    ref = norm(ref_waves) if ref_waves is not None else None
    results: dict[str, MetricResult] = {}

    if embedder is not None and ref is not None:
        emb_gen = _fd_embeddings(embedder, gen, gen_sr, fd_frames)
        emb_ref = _fd_embeddings(embedder, ref, ref_sr, fd_frames)
        results["fd"] = MetricResult(frechet_distance(emb_gen, emb_ref), n=len(gen), model=embedder.name,
                                     details={"n_ref": len(ref), "rows_gen": len(emb_gen),
                                              "rows_ref": len(emb_ref), "frames": fd_frames})

    if clap is not None and captions is not None:
        if len(captions) != len(gen):
            raise ValueError(f"{len(captions)} captions for {len(gen)} generated clips")
        results["clap"] = MetricResult(clap_score(clap.embed_audio(gen, gen_sr), clap.embed_text(captions)),
                                       n=len(gen), model=clap.name)

    if tagger is not None and ref is not None:
        if len(ref) != len(gen):
            raise ValueError(f"KL pairs clips by index: {len(gen)} generated vs {len(ref)} references")
        out_gen, inputs = _tag(tagger, gen, gen_sr)
        out_ref, _ = _tag(tagger, ref, ref_sr)
        kl = kl_divergence(out_ref, out_gen, kind=kl_kind, inputs=inputs)
        results["kl"] = MetricResult(kl["kl"], n=len(gen), model=getattr(tagger, "name", type(tagger).__name__),
                                     details={"direction": KL_DIRECTION, "kind": kl_kind,
                                              "kl_ref_gen": kl["kl_ref_gen"]})
    return results
