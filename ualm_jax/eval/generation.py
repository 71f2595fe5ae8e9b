"""Generation metrics: audio generated for a prompts file and scored, for `ualm eval`
(ualm_jax/cli/eval.py) and the train loop's eval hook (the same numbers).

Prompts: JSON lines {"prompt", "reference"?: audio path relative to the prompts file,
"events"?: the world's event dicts} (the world's prompts.jsonl has all three). Metrics, each
naming the model that produced it; one whose model or data is missing is skipped and said so:
  gen/clap         mean cosine of CLAP(generated audio) and CLAP(prompt)        (--clap DIR)
  gen/fd           Frechet distance, generated vs the prompts' reference audio  (--fd-model)
  gen/world_match  share of clips whose analysed events strictly match the prompt (world prompts,
                   i.e. lines with "events"; caption_match strict, as the demo's t2a "match")
  gen/world_judge  mean analyser.judge score against the prompt (the make-pairs builtin judge)
The maths is ualm_jax.eval (evaluate_generation) and data_pipelines.demo.analyser; this module only
generates, loads references and reports. The train loop calls generation_eval (eval.prompts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import ualm_jax.storage as storage
from ualm_jax.eval.metrics import MetricResult
from ualm_jax.infer.generation_config import GenerationConfig

WORLD_JUDGE = "world-analyser(data_pipelines.demo.analyser, DSP)"
METRICS_FILE = "eval_metrics.json"
_GEN = GenerationConfig()  # the sampling defaults `ualm generate` and the Python API use


@dataclass
class GenerationEval:
    results: dict[str, MetricResult]  # "gen/<metric>" -> value, n, model
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    prompts: int = 0
    mean_seconds: float = 0.0  # of the generated clips (0 for empty generations)
    samples: list = field(default_factory=list, repr=False)  # [(caption, wave)]: the first few
    sample_rate: int = 0


AUDIO_SUMMARIES = 4  # generated clips kept for the trackers' audio summaries


def make_fd_embedder(spec: str | None):
    """None | 'mel-stats' (weight-free, smoke tests only) | DIR (a local transformers audio model,
    mean-pooled hidden states: the OpenL3 stand-in)."""
    if not spec:
        return None
    from ualm_jax.eval import embedders as E

    if spec == "mel-stats":
        return E.MelStatsEmbedder()
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--fd-model {spec!r}: neither 'mel-stats' nor a model directory")
    return E.HFAudioEmbedder.from_pretrained(spec)


def make_clap(path: str | None):
    if not path:
        return None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--clap {path!r}: no CLAP model directory there")
    from ualm_jax.eval.embedders import ClapEmbedder

    return ClapEmbedder.from_pretrained(path)


def generation_eval(m, prompts: list[dict], base_dir, clap=None, fd_embedder=None,
                    cfg_scale: float = _GEN.cfg_scale, max_prompts: int | None = None,
                    seed: int = _GEN.seed, *, max_new: int = _GEN.max_new,
                    max_audio_frames: int = _GEN.max_audio_frames, batch_size: int = _GEN.batch,
                    out_dir=None, uncond: str = _GEN.uncond) -> GenerationEval:
    """Generate one clip per prompt (m: tasks.Loaded) and compute every metric that can be.

    On several processes every one generates every batch (one program over all devices), then
    decodes, writes and scores the prompts it owns (prompt i: process i mod processes); the
    per-clip parts are pooled (distributed.allgather_json), so every process gets the metrics of
    all the prompts, the same numbers one process gives."""
    from data_pipelines.features import load_audio
    from ualm_jax.distributed import allgather_json, owns
    from ualm_jax.eval.generation_eval import clip_features, merge_features
    from ualm_jax.infer.prompts import Synthesizer

    prompts = list(prompts)[:max_prompts] if max_prompts else list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate")
    synth = Synthesizer(m, GenerationConfig(max_new=max_new, max_audio_frames=max_audio_frames,
                                            cfg_scale=cfg_scale, uncond=uncond),
                        min(batch_size, len(prompts)))
    sr = synth.sample_rate
    captions = [p["prompt"].strip() for p in prompts]
    mine = [i for i in range(len(prompts)) if owns(i)]
    waves = synth.waves(captions, seed, keep=set(mine))
    seconds = [len(waves[i]) / sr for i in mine]
    # An empty generation still counts (as 0.1 s of silence), so metrics see every prompt.
    own = {i: waves[i] if len(waves[i]) else np.zeros(sr // 10, np.float32) for i in mine}
    if out_dir is not None:  # a local folder or a gs:// URL
        import io

        import soundfile as sf

        out = storage.as_path(out_dir)
        if not storage.is_url(out_dir):
            out.mkdir(parents=True, exist_ok=True)
        for i, w in own.items():
            buf = io.BytesIO()
            sf.write(buf, w, sr, subtype="FLOAT", format="WAV")
            (out / f"sample_{i:04d}.wav").write_bytes(buf.getvalue())

    skipped: dict[str, str] = {}
    refs = [p["reference"] for p in prompts if p.get("reference")]
    fd = None
    if fd_embedder is None:
        skipped["gen/fd"] = "no --fd-model"
    elif len(refs) < 2 or len(prompts) < 2:
        skipped["gen/fd"] = f"needs >= 2 prompts with 'reference' audio ({len(refs)} given)"
    else:
        fd = fd_embedder
    if clap is None:
        skipped["gen/clap"] = "no --clap model"
    part = clip_features([own[i] for i in mine], sr, [captions[i] for i in mine],
                         embedder=fd, clap=clap)
    world = [(i, prompts[i]) for i in mine if prompts[i].get("events") is not None]
    if world:
        from data_pipelines.demo.analyser import score_caption

        # Against the prompt text, not the reference's events: a prompt states no timing.
        part["world"] = [list(score_caption(own[i], captions[i], sr)) for i, _ in world]
    part["seconds"] = seconds
    parts = allgather_json(part)
    ref_waves = [load_audio(str(Path(base_dir) / r), sr) for r in refs] if fd is not None else None
    raw = merge_features(parts, len(prompts), ref_waves, sr if ref_waves else None,
                         embedder=fd, clap=clap)
    results = {f"gen/{k}": v for k, v in raw.items()}
    scored = [x for p in parts for x in p.get("world", [])]
    if scored:
        strict, scores = zip(*scored)
        results["gen/world_match"] = MetricResult(float(np.mean(strict)), len(scored), WORLD_JUDGE)
        results["gen/world_judge"] = MetricResult(float(np.mean(scores)), len(scored), WORLD_JUDGE)
    elif not any(p.get("events") is not None for p in prompts):
        skipped["gen/world_match"] = "no prompt carries 'events' (not the procedural world)"
    mean_seconds = float(np.mean([x for p in parts for x in p["seconds"]]))
    return GenerationEval(results, skipped, len(prompts), mean_seconds,
                          samples=[(captions[i], own[i]) for i in mine][:AUDIO_SUMMARIES],
                          sample_rate=sr)


def format_table(ev: GenerationEval, header: str = "") -> str:
    lines = [header] if header else []
    lines.append(f"{'metric':<16} {'value':>10} {'n':>5}  model")
    for k in sorted(ev.results):
        r = ev.results[k]
        lines.append(f"{k:<16} {r.value:>10.4f} {r.n:>5}  {r.model}")
    for k, why in sorted(ev.skipped.items()):
        lines.append(f"{k:<16} {'-':>10} {'-':>5}  skipped: {why}")
    return "\n".join(lines)
