"""Evaluation maths, numpy only: Frechet distance, tag KL, CLAP score, answer accuracy.

The embedding/tagging models live in `embedders.py`; this module only sees arrays, so the maths
stays ours and the same whichever model produced the numbers.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Iterable

import numpy as np
import scipy.linalg

# The direction `kl_divergence(...)["kl"]` reports. stable-audio-metrics (the paper's protocol)
# computes torch's kl_div(log(ref + 1e-6), gen) = sum gen * (log gen - log(ref + 1e-6)), i.e.
# KL(generated || reference); AudioCraft and audioldm_eval report the other direction.
KL_DIRECTION = "KL(generated || reference)"


@dataclasses.dataclass
class MetricResult:
    """One metric value, how many items it averaged over, and the model that embedded them."""

    value: float
    n: int
    model: str
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- Frechet distance

def gaussian_stats(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of [N, D] embeddings, as pytorch-fid does."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"need [N>=2, D] embeddings, got shape {emb.shape}")
    return emb.mean(axis=0), np.atleast_2d(np.cov(emb, rowvar=False))


def _sqrtm(mat: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's sqrtm; also says whether it flagged the matrix as singular (LinAlgWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(mat)
    if isinstance(root, tuple):  # older scipy with disp=False semantics
        root = root[0]
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return root, singular


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                                imag_tol: float = 1e-3) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians.

    When S1 S2 is singular (fewer items than dimensions, dead embedding units) sqrtm is
    unreliable, so eps * I is added to both covariances first. Round-off leaves small imaginary
    parts in sqrtm of a non-symmetric product: dropped when the diagonal's are below imag_tol,
    otherwise an error (the statistics are broken, not the arithmetic).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    covmean, singular = _sqrtm(sigma1 @ sigma2)
    if singular or not np.isfinite(covmean).all():
        offset = eps * np.eye(sigma1.shape[0])
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=imag_tol):
            raise ValueError(f"sqrtm has imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance(emb_a: np.ndarray, emb_b: np.ndarray, eps: float = 1e-6,
                     imag_tol: float = 1e-3) -> float:
    """Frechet distance between Gaussians fitted to [N, D] and [M, D] embeddings."""
    mu_a, sigma_a = gaussian_stats(emb_a)
    mu_b, sigma_b = gaussian_stats(emb_b)
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps=eps, imag_tol=imag_tol)


# ---------------------------------------------------------------- KL on tagger outputs

def _kl_rows(p: np.ndarray, q: np.ndarray, eps: float) -> np.ndarray:
    """sum_c p log(p / (q + eps)) per row; 0 log 0 = 0. eps sits on q only, like torch kl_div
    callers in stable-audio-metrics / AudioCraft, so a zero in q costs log(1/eps), not inf."""
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return (plogp - p * np.log(q + eps)).sum(axis=-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def kl_divergence(ref: np.ndarray, gen: np.ndarray, kind: str = "softmax", inputs: str = "logits",
                  eps: float = 1e-6) -> dict[str, float]:
    """Paired KL between a tagger's outputs on reference [N, C] and generated [N, C] audio.

    Row i of `ref` and of `gen` belong to the same prompt. Per item a KL is computed, then the
    mean over items is returned in both directions:
      "kl"          = "kl_gen_ref" = mean_i KL(gen_i || ref_i)   (stable-audio-metrics' PaSST KL)
      "kl_ref_gen"  = mean_i KL(ref_i || gen_i)                   (AudioCraft / audioldm_eval "kld")
    kind="softmax": each row becomes one distribution over C classes (softmax of logits, or the
      given probabilities renormalised), as stable-audio-metrics and AudioCraft do for PaSST.
    kind="sigmoid": each class is its own Bernoulli (multi-label taggers); the per-item KL is the
      sum over classes of KL(Bern(p_c) || Bern(q_c)). This is a proper KL, unlike audioldm_eval's
      "kl_sigmoid", which drops the (1 - p) terms.
    inputs: "logits" or "probs".
    """
    ref, gen = np.asarray(ref, np.float64), np.asarray(gen, np.float64)
    if ref.shape != gen.shape or ref.ndim != 2:
        raise ValueError(f"need matching [N, C] arrays, got {ref.shape} and {gen.shape}")
    if inputs not in ("logits", "probs"):
        raise ValueError(f"inputs must be 'logits' or 'probs', got {inputs!r}")
    if kind == "softmax":
        if inputs == "logits":
            p_ref, p_gen = _softmax(ref), _softmax(gen)
        else:
            p_ref = ref / ref.sum(axis=-1, keepdims=True)
            p_gen = gen / gen.sum(axis=-1, keepdims=True)
        gen_ref, ref_gen = _kl_rows(p_gen, p_ref, eps), _kl_rows(p_ref, p_gen, eps)
    elif kind == "sigmoid":
        p_ref, p_gen = (_sigmoid(ref), _sigmoid(gen)) if inputs == "logits" else (ref, gen)

        def bern(p, q):  # [N, C] probabilities -> [N] summed Bernoulli KL
            stack = lambda a: np.stack([a, 1.0 - a], axis=-1)  # noqa: E731
            return _kl_rows(stack(p), stack(q), eps).sum(axis=-1)

        gen_ref, ref_gen = bern(p_gen, p_ref), bern(p_ref, p_gen)
    else:
        raise ValueError(f"kind must be 'softmax' or 'sigmoid', got {kind!r}")
    return {"kl": float(gen_ref.mean()), "kl_gen_ref": float(gen_ref.mean()),
            "kl_ref_gen": float(ref_gen.mean())}


# ---------------------------------------------------------------- CLAP score

def clap_cosines(audio_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity between row i of the audio and row i of the text embeddings, per row."""
    a, t = np.asarray(audio_emb, np.float64), np.asarray(text_emb, np.float64)
    if a.shape != t.shape or a.ndim != 2:
        raise ValueError(f"need matching [N, D] arrays, got {a.shape} and {t.shape}")
    # A floor on the norm product (eps 1e-8, as torch.cosine_similarity): zero rows give 0, not nan.
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(t, axis=1), 1e-8)
    return (a * t).sum(axis=1) / denom


def clap_score(audio_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean cosine similarity between row i of the audio and row i of the text embeddings."""
    return float(clap_cosines(audio_emb, text_emb).mean())


# ---------------------------------------------------------------- text answers

_NOT_ANSWER = re.compile(r"[^\w\s,+\-=]")


def normalise_answer(text: str) -> str:
    """The one answer normaliser (accuracy here, the demo world's eval in eval/demo_world.py): lower case; punctuation
    other than `, + - =` (which carry meaning in arithmetic and list answers) becomes a space;
    commas are written "a, b"; whitespace is collapsed. Articles are kept.
    '  The Noise  burst.' -> 'the noise burst'; '3 ,5, 9.' -> '3, 5, 9'."""
    text = _NOT_ANSWER.sub(" ", str(text).lower()).replace(",", " , ")
    return " ".join(text.split()).replace(" ,", ",")


def accuracy(predictions: Iterable[str], references: Iterable[str], normalise: bool = True) -> float:
    """Fraction of exact matches; with normalise, compared after `normalise_answer`.

    A reference may be a string or a list of acceptable strings.
    """
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    if not preds:
        raise ValueError("no predictions")
    norm = normalise_answer if normalise else (lambda s: str(s))
    hits = 0
    for pred, ref in zip(preds, refs):
        options = [ref] if isinstance(ref, str) else list(ref)
        hits += norm(pred) in {norm(o) for o in options}
    return hits / len(preds)


def interval95(values, binary: bool) -> list:
    """A 95% interval for the mean of `values`: Wilson's for a proportion (binary outcomes, right
    at small n and near 0 or 1), else mean +- 1.96 standard errors (clipped to the values' range).
    [nan, nan] for no values."""
    x = np.asarray(values, np.float64)
    n = len(x)
    if n == 0:
        return [float("nan"), float("nan")]
    z = 1.959963984540054
    if binary:
        p = x.mean()
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]
    half = z * (x.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0)
    return [float(max(x.min(), x.mean() - half)), float(min(x.max(), x.mean() + half))]

