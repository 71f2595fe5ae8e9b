"""`ualm dpo make-pairs`: DPO preference pairs from a checkpoint's own samples, ranked by a judge.

docs/ualm.md ("DPO for generation"): sample the model N times per prompt, score every sample against
its prompt, keep the best and the worst as (chosen, rejected) when their scores differ by at least
`threshold`. Output folder OUT:
  OUT/audio/<pid>_s<j>.wav     the chosen and rejected samples (float WAV at the codec's rate)
  OUT/pairs.jsonl              preference manifest (data_pipelines/builders/preference.py):
                               {"prompt", "chosen", "rejected", "id", "score_chosen", "score_rejected"}
  OUT/chosen.jsonl             the chosen samples as a captions manifest ({"audio", "caption"}) for
                               the adaptation SFT (`ualm data build captions --task t2a`)
  OUT/make_pairs_report.json   counts, skipped prompts with reasons, mean scores, the judge
Then `ualm data build preference --manifest OUT/pairs.jsonl --out D --tokenizer T --codec C`
(the report's `build_command`). A prompt gives no pair when fewer than two of its samples reach
`min_seconds` (the builder's own minimum), when best and worst tie, or when the gap is below
`threshold`; each case is listed with its reason.

Judges (`make_judge`): "builtin" = the procedural world's DSP judge (data_pipelines.demo.analyser.judge,
score in [0, 1]); "clap:DIR" = cosine of a local transformers CLAP model's audio and caption
embeddings (in [-1, 1]).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from ualm_jax.distributed import allgather_json, is_main, owns
from ualm_jax.infer.decode import GenerationConfig
from ualm_jax.infer.prompts import Synthesizer, derive_seed, read_prompts  # noqa: F401

REPORT_FILE = "make_pairs_report.json"
MANIFEST_FILE = "pairs.jsonl"
CHOSEN_FILE = "chosen.jsonl"
_GEN = GenerationConfig()  # the sampling defaults `ualm generate` and the Python API use


# Judges -------------------------------------------------------------------------------------------
class BuiltinJudge:
    """The procedural world's judge: caption_match of what the DSP analyser hears, in [0, 1]."""

    name = "builtin:world-analyser(data_pipelines.demo.analyser)"

    def score(self, waves, sr: int, captions) -> np.ndarray:
        from data_pipelines.demo.analyser import judge
        from data_pipelines.demo.world import SAMPLE_RATE
        from data_pipelines.features import resample, to_mono

        # The analyser's thresholds assume the world's rate; loudness is part of the caption,
        # so no level normalisation here.
        return np.array([judge(resample(to_mono(w), sr, SAMPLE_RATE), c, SAMPLE_RATE)
                         for w, c in zip(waves, captions)], np.float64)


class ClapJudge:
    """Cosine of CLAP(audio) and CLAP(caption) per sample, in [-1, 1] (the CLAP-score maths)."""

    def __init__(self, embedder):
        self.embedder, self.name = embedder, embedder.name

    def score(self, waves, sr: int, captions) -> np.ndarray:
        from ualm_jax.eval.embedders import peak_normalise
        from ualm_jax.eval.metrics import clap_score

        # Peak-normalised as evaluate_generation does, so the judge ranks like the metric scores.
        waves = [peak_normalise(np.asarray(w, np.float32)) for w in waves]
        a, t = self.embedder.embed_audio(waves, sr), self.embedder.embed_text(list(captions))
        return np.array([clap_score(a[i:i + 1], t[i:i + 1]) for i in range(len(waves))])


JUDGE_HELP = ("'builtin' (the procedural world's DSP judge, data_pipelines.demo.analyser) or "
              "'clap:DIR' (a local transformers CLAP model directory)")


def make_judge(spec):
    """'builtin' | 'clap:DIR' -> a judge with `name` and `score(waves, sr, captions)`.
    An object that already has both is returned as is."""
    if not isinstance(spec, str):
        if hasattr(spec, "score") and hasattr(spec, "name"):
            return spec
        raise ValueError(f"a judge must be {JUDGE_HELP}, got {type(spec).__name__}")
    if spec == "builtin":
        return BuiltinJudge()
    if spec.startswith("clap:"):
        path = spec[len("clap:"):]
        if not path:
            raise ValueError("judge 'clap:' needs the CLAP model directory: clap:DIR")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"judge {spec!r}: no CLAP model directory at {path}")
        from ualm_jax.eval.embedders import ClapEmbedder

        return ClapJudge(ClapEmbedder.from_pretrained(path))
    raise ValueError(f"unknown judge {spec!r}: use {JUDGE_HELP}")


# Pairs --------------------------------------------------------------------------------------------
def _prompt_id(i: int, row: dict) -> str:
    raw = str(row.get("id", ""))
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._")[:60]
    return f"{i:05d}_{safe}" if safe else f"{i:05d}"


def _choose(scored: list, samples: int, threshold: float, min_seconds: float):
    """scored [(score, sample)] of one prompt -> ((best, worst), None, None), or (None, reason,
    detail) when it gives no pair. Ties never pair: a DPO pair of equals is noise."""
    if len(scored) < 2:
        return None, "too_few_samples", (f"{len(scored)} of {samples} samples reached "
                                         f"{min_seconds} s with a finite score")
    ranked = sorted(scored, key=lambda x: (-x[0], x[1]))
    best, worst = ranked[0], ranked[-1]
    gap = best[0] - worst[0]
    if gap <= 0 or gap < threshold:
        return None, "tie" if gap <= 0 else "below_threshold", (
            f"best {best[0]:.4f} - worst {worst[0]:.4f} = {gap:.4f} (threshold {threshold})")
    return (best, worst), None, None


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return float(np.mean(xs)) if xs else None


def make_pairs(checkpoint, prompts_file, samples: int, judge, out_dir, threshold: float = 0.1,
               cfg_scale: float = _GEN.cfg_scale, seed: int = _GEN.seed, *, tokenizer=None,
               codec=None, max_new: int = _GEN.max_new,
               max_audio_frames: int = _GEN.max_audio_frames,
               temperature: float = _GEN.audio_temperature, top_k: int = _GEN.top_k,
               batch_size: int = _GEN.batch, min_seconds: float = 0.1, loaded=None,
               uncond: str = _GEN.uncond, overrides=()) -> dict:
    """Sample `samples` clips per prompt, judge them, write pairs; -> the report (also in
    OUT/make_pairs_report.json). `loaded` (a tasks.Loaded) skips loading `checkpoint`."""
    import soundfile as sf

    if samples < 2:
        raise ValueError(f"--samples must be at least 2 (a pair needs a best and a worst), got {samples}")
    if threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {threshold}")
    derive_seed(seed)  # rejects negative seeds before any work
    judge = make_judge(judge)  # a bad spec fails before the checkpoint loads
    prompts = read_prompts(prompts_file)
    if loaded is None:
        from ualm_jax.infer.tasks import load

        loaded = load(checkpoint, tokenizer, codec, overrides=overrides)
    synth = Synthesizer(loaded, GenerationConfig(
        max_new=max_new, max_audio_frames=max_audio_frames, audio_temperature=temperature,
        top_k=top_k, cfg_scale=cfg_scale, uncond=uncond), min(batch_size, len(prompts)))
    sr = synth.sample_rate
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    started = time.time()
    # Every process generates every block (one program over all devices); each judges and writes
    # the prompts it owns (prompt i: process i mod processes), then process 0 merges.
    too_short, all_scores, kept, skipped, entries = 0, [], [], [], []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        captions = [r["prompt"].strip() for r in rows]
        uids = list(range(start, start + len(rows)))
        mine = [i for i in range(len(rows)) if owns(start + i)]
        # [sample][prompt] waveforms; sample j of every prompt draws with derive_seed(seed, j).
        waves = [synth.waves(captions, derive_seed(seed, j), uids, keep=set(mine))
                 for j in range(samples)]
        valid = {i: [j for j in range(samples) if len(waves[j][i]) >= min_seconds * sr]
                 for i in mine}
        too_short += sum(samples - len(v) for v in valid.values())
        flat = [(i, j) for i in mine for j in valid[i]]
        scores = judge.score([waves[j][i] for i, j in flat], sr,
                             [captions[i] for i, _ in flat]) if flat else []
        per_prompt: dict[int, list] = {}
        for (i, j), s in zip(flat, scores):
            if np.isfinite(s):
                per_prompt.setdefault(i, []).append((float(s), j))
                all_scores.append(float(s))
        for i in mine:
            row = rows[i]
            pick, reason, detail = _choose(per_prompt.get(i, []), samples, threshold, min_seconds)
            if pick is None:
                skipped.append({"line": row["_line"], "id": row.get("id"),
                                "prompt": captions[i], "reason": reason, "detail": detail})
                continue
            (best, jb), (worst, jw) = pick
            pid = _prompt_id(start + i, row)
            rel_c, rel_r = f"audio/{pid}_s{jb}.wav", f"audio/{pid}_s{jw}.wav"
            # Float WAV: what the judge scored is exactly what the builder re-encodes.
            sf.write(out / rel_c, waves[jb][i], sr, subtype="FLOAT")
            sf.write(out / rel_r, waves[jw][i], sr, subtype="FLOAT")
            split = {"split": row["split"]} if row.get("split") in ("train", "validation") else {}
            entries.append([start + i,
                            {"prompt": captions[i], "chosen": rel_c, "rejected": rel_r,
                             "id": row.get("id", pid), "score_chosen": best,
                             "score_rejected": worst, **split},
                            {"audio": rel_c, "caption": captions[i], **split}])
            kept.append((best, worst))
    parts = allgather_json({"entries": entries, "kept": kept, "skipped": skipped,
                            "scores": all_scores, "too_short": too_short})
    entries = sorted((e for p in parts for e in p["entries"]), key=lambda e: e[0])
    kept = [tuple(k) for p in parts for k in p["kept"]]
    skipped = sorted((x for p in parts for x in p["skipped"]), key=lambda x: x["line"])
    all_scores = [x for p in parts for x in p["scores"]]
    too_short = sum(p["too_short"] for p in parts)
    if is_main():
        with open(out / MANIFEST_FILE, "w") as manifest, open(out / CHOSEN_FILE, "w") as chosen_f:
            for _, pair, chosen in entries:
                manifest.write(json.dumps(pair) + "\n")
                chosen_f.write(json.dumps(chosen) + "\n")
    by_reason: dict[str, int] = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    codec_dir = codec or getattr(loaded.cfg.data, "codec", "") or "CODEC_DIR"
    tok_path = getattr(loaded.tokenizer, "path", None) or tokenizer or "TOKENIZER"
    report = {
        "checkpoint": str(checkpoint), "prompts_file": str(prompts_file), "judge": judge.name,
        "threshold": threshold, "cfg_scale": cfg_scale, "uncond": uncond, "seed": seed,
        "samples_per_prompt": samples, "prompts": len(prompts), "samples": len(prompts) * samples,
        "samples_too_short": too_short, "min_seconds": min_seconds, "pairs": len(kept),
        "skipped": len(skipped), "skipped_by_reason": by_reason, "skipped_prompts": skipped,
        "mean_score": _mean(all_scores), "mean_score_chosen": _mean(c for c, _ in kept),
        "mean_score_rejected": _mean(r for _, r in kept), "mean_gap": _mean(c - r for c, r in kept),
        "sample_rate": sr, "manifest": MANIFEST_FILE, "chosen_manifest": CHOSEN_FILE,
        "build_command": f"ualm data build preference --manifest {out / MANIFEST_FILE} "
                         f"--out BUILT_DIR --tokenizer {tok_path} --codec {codec_dir}",
        "seconds": round(time.time() - started, 2),
    }
    if is_main():
        (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
