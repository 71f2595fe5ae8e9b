"""The demo's task metrics on the procedural world's validation split (data_pipelines/demo/world.py),
scored with the world's own analyser, so no downloaded model is needed.

    results = evaluate_world(load("runs/demo"), "runs/demo/data/world", "runs/demo/world_eval")
    print(format_world_table(results))

Metrics (each in [0, 1]; one batched generation for the three text tasks together, and one per
guidance scale for t2a):
  caption   exact: the generated caption names the same events, in order, with the same stated
            attributes as the reference (analyser.parse_caption of both are equal); score: the
            graded caption_match of the true events against the generated caption.
  audio_qa  exact answer after metrics.normalise_answer (lower case; punctuation other than
            `, + - =` and extra spaces dropped).
  text      the same on the held-out text problems (no audio).
  t2a       per guidance scale: match = share of generated clips whose analysed events strictly
            match their caption (caption_match strict: same count; type and every attribute the
            caption states); judge = mean analyser.judge score.
Generated clips are written to OUT/t2a_cfg<scale>/<clip id>.wav; the results to OUT/world_eval.json.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ualm_jax.eval.metrics import interval95, normalise_answer

TEXT_MAX_NEW = 40  # positions for a text reply: the longest world answer takes ~22 tokens


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


def _read(world_dir: str, rel: str) -> np.ndarray:
    import soundfile as sf

    return sf.read(os.path.join(world_dir, rel), dtype="float32")[0]


def _validation(world: dict, max_items: int) -> tuple:
    clips = [c for c in world["clips"] if c["split"] == "validation"
             and c["events"] and c["events"][0].type != "speech"][:max_items]
    qa = [(c, q) for c in world["clips"] if c["split"] == "validation" for q in c["qa"]][:max_items]
    problems = [p for p in world["text_problems"] if p["split"] == "validation"][:max_items]
    return clips, qa, problems


def _score_captions(clips, out) -> dict:
    from data_pipelines.demo.analyser import caption_match, parse_caption

    exact = [parse_caption(g) == parse_caption(c["caption"]) for g, c in zip(out, clips)]
    score = [float(caption_match(c["events"], g)) for g, c in zip(out, clips)]
    return {"n": len(clips), "exact": _mean(exact), "score": _mean(score),
            "exact_ci": interval95(exact, True), "score_ci": interval95(score, False),
            "examples": [{"id": c["id"], "reference": c["caption"], "generated": g}
                         for c, g in zip(clips, out)]}


def _score_answers(questions, references, out) -> dict:
    exact = [normalise_answer(g) == normalise_answer(r) for g, r in zip(out, references)]
    return {"n": len(questions), "exact": _mean(exact), "exact_ci": interval95(exact, True),
            "examples": [{"question": q, "reference": r, "generated": g}
                         for q, r, g in zip(questions, references, out)]}


def _text_tasks(m, world_dir, clips, qa, problems, gen_cfg) -> dict:
    """Captioning, audio QA and text problems in ONE batched generation: all three are a text
    reply to one user turn (tasks.answer renders captioning exactly as tasks.caption does), and
    each generate call compiles afresh."""
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT
    from ualm_jax.infer.tasks import answer

    texts = [AUDIO_TO_CAPTION_PROMPT] * len(clips) + [q["question"] for _, q in qa] + \
        [p["question"] for p in problems]
    waves = [_read(world_dir, c["audio"]) for c in clips] + \
        [_read(world_dir, c["audio"]) for c, _ in qa] + [None] * len(problems)
    out = answer(m, texts, waves, gen_cfg) if texts else []
    a, b = len(clips), len(clips) + len(qa)
    return {"caption": _score_captions(clips, out[:a]),
            "audio_qa": _score_answers(texts[a:b], [q["answer"] for _, q in qa], out[a:b]),
            "text": _score_answers(texts[b:], [p["answer"] for p in problems], out[b:])}


def _t2a(m, clips, out_dir, scale, frames, gen_cfg) -> dict:
    import soundfile as sf

    from data_pipelines.demo.analyser import score_caption
    from ualm_jax.infer.tasks import text_to_audio

    folder = os.path.join(out_dir, f"t2a_cfg{scale:g}")
    os.makedirs(folder, exist_ok=True)
    entry = {"cfg_scale": float(scale), "n": len(clips), "match": 0.0, "judge": 0.0,
             "dir": folder, "samples": []}
    if not clips:
        return entry
    k = m.cfg.model.num_codebooks
    cfg = _with(gen_cfg, cfg_scale=float(scale), max_audio_frames=frames, max_new=frames + k + 1)
    codes = text_to_audio(m, [c["caption"] for c in clips], cfg)
    matches, scores = [], []
    for c, x in zip(clips, codes):
        wave = m.codec.decode(x) if len(x) else np.zeros(0, np.float32)
        path = os.path.join(folder, f"{c['id']}.wav")
        sf.write(path, wave, m.codec.sample_rate)
        strict, score = score_caption(wave, c["caption"], m.codec.sample_rate)
        matches.append(strict)
        scores.append(score)
        entry["samples"].append((c["caption"], path))
    entry.update(match=_mean(matches), judge=_mean(scores), match_ci=interval95(matches, True),
                 judge_ci=interval95(scores, False))
    return entry


def _with(cfg, **changes):
    from dataclasses import replace

    return replace(cfg, **changes)


def evaluate_world(m, world_dir: str, out_dir: str, max_items: int = 32,
                   cfg_scales=(1.0, 3.0), seed: int = 0, text_max_new: int = TEXT_MAX_NEW,
                   audio_frames: int | None = None) -> dict:
    """Score a loaded model (ualm_jax.infer.tasks.Loaded, with its codec) on the world's held-out
    clips and problems, at most max_items per task. audio_frames caps a generated clip (default:
    the world's clip length; less only for quick smoke runs). Also writes OUT/world_eval.json.
    -> {"caption": {n, exact, score, examples}, "audio_qa": {n, exact, examples}, "text": {...},
        "t2a": [{cfg_scale, n, match, judge, dir, samples}],
        "samples": [(title, wav path)]: each clip at every scale, clip by clip}"""
    from data_pipelines.demo.world import load_world
    from ualm_jax.config import ConfigError
    from ualm_jax.infer.decode import GenerationConfig

    if m.codec is None:
        raise ConfigError("evaluate_world needs the model's codec (data.codec or --codec)")
    world = load_world(world_dir)
    os.makedirs(out_dir, exist_ok=True)
    clips, qa, problems = _validation(world, max_items)
    results = _text_tasks(m, world_dir, clips, qa, problems,
                          GenerationConfig(max_new=text_max_new, seed=seed))
    frames = audio_frames or int(round(world["settings"]["clip_seconds"] * m.codec.frame_rate))
    results["t2a"] = [_t2a(m, clips, out_dir, s, frames, GenerationConfig(seed=seed))
                      for s in cfg_scales]
    # Clip by clip, every scale of a clip together: a plot of the first few compares scales.
    results["samples"] = [(f"cfg {e['cfg_scale']:g}: {e['samples'][i][0]}", e["samples"][i][1])
                          for i in range(len(clips)) for e in results["t2a"]]
    with open(os.path.join(out_dir, "world_eval.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    return results


def format_world_table(results: dict) -> str:
    """The headline numbers as an aligned text table."""
    def ci(entry, key):
        lo, hi = entry.get(f"{key}_ci") or (float("nan"), float("nan"))
        return f"[{lo:.3f}, {hi:.3f}]"

    rows = [("task", "metric", "value", "95% interval", "n")]
    c = results["caption"]
    rows += [("caption", "exact (same events)", f"{c['exact']:.3f}", ci(c, "exact"), str(c["n"])),
             ("caption", "event match score", f"{c['score']:.3f}", ci(c, "score"), str(c["n"]))]
    for name, label in (("audio_qa", "audio QA"), ("text", "text problems")):
        r = results[name]
        rows.append((label, "exact answer", f"{r['exact']:.3f}", ci(r, "exact"), str(r["n"])))
    for e in results["t2a"]:
        task = f"text-to-audio cfg {e['cfg_scale']:g}"
        rows += [(task, "strict event match", f"{e['match']:.3f}", ci(e, "match"), str(e["n"])),
                 (task, "judge score", f"{e['judge']:.3f}", ci(e, "judge"), str(e["n"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(v.rjust(w) if i >= 2 else v.ljust(w) for i, (v, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
