"""`ualm eval`: generate audio for a prompts file and score it; the same numbers as a train hook.

    ualm eval --checkpoint RUN --prompts world/prompts.jsonl --clap CLAP_DIR --fd-model mel-stats
Prompts: JSON lines {"prompt", "reference"?: audio path relative to the prompts file,
"events"?: the world's event dicts} (the world's prompts.jsonl has all three). Metrics, each
naming the model that produced it; one whose model or data is missing is skipped and said so:
  gen/clap         mean cosine of CLAP(generated audio) and CLAP(prompt)        (--clap DIR)
  gen/fd           Frechet distance, generated vs the prompts' reference audio  (--fd-model)
  gen/world_match  share of clips whose analysed events strictly match the prompt (world prompts,
                   i.e. lines with "events"; caption_match strict, as the demo's t2a "match")
  gen/world_judge  mean analyser.judge score against the prompt (the make-pairs builtin judge)
The maths is ualm_jax.eval (evaluate_generation) and data_pipelines.demo_world.analyser; this module only
generates, loads references and reports. The train loop calls generation_eval (eval.prompts).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import ualm_jax.storage as storage
from ualm_jax.eval.metrics import MetricResult

WORLD_JUDGE = "world-analyser(data_pipelines.demo_world.analyser, DSP)"
METRICS_FILE = "eval_metrics.json"


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
                    cfg_scale: float = 3.0, max_prompts: int | None = None, seed: int = 0, *,
                    max_new: int = 256, max_audio_frames: int = 500, batch_size: int = 16,
                    out_dir=None, uncond: str = "ours") -> GenerationEval:
    """Generate one clip per prompt (m: tasks.Loaded) and compute every metric that can be.

    On several processes every one generates every batch (one program over all devices), then
    decodes, writes and scores the prompts it owns (prompt i: process i mod processes); the
    per-clip parts are pooled (distributed.allgather_json), so every process gets the metrics of
    all the prompts, the same numbers one process gives."""
    from data_pipelines.features import load_audio
    from ualm_jax.distributed import allgather_json, owns
    from ualm_jax.eval.generation_eval import clip_features, merge_features
    from ualm_jax.infer.decode import GenerationConfig
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
        from data_pipelines.demo_world.analyser import score_caption

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


def eval_command(args) -> int:
    from ualm_jax.distributed import is_main, maybe_initialize
    from ualm_jax.infer.prompts import read_prompts
    from ualm_jax.infer.tasks import load

    maybe_initialize()  # a multi-host job: every host generates, each scores its own prompts

    prompts = read_prompts(args.prompts)  # before loading anything: a bad file fails fast
    clap, fd = make_clap(args.clap), make_fd_embedder(args.fd_model)
    m = load(args.checkpoint, args.tokenizer, args.codec, overrides=args.overrides)
    ev = generation_eval(m, prompts, Path(args.prompts).resolve().parent, clap, fd, args.cfg,
                         args.max_prompts, args.seed, max_new=args.max_new,
                         max_audio_frames=args.max_audio_frames, batch_size=args.batch_size,
                         out_dir=args.out, uncond=args.uncond)
    payload = {"checkpoint": str(args.checkpoint), "prompts_file": str(args.prompts),
               "prompts": ev.prompts, "cfg_scale": args.cfg, "uncond": args.uncond,
               "seed": args.seed,
               "mean_seconds": ev.mean_seconds,
               "metrics": {k: r.to_dict() for k, r in sorted(ev.results.items())},
               "skipped": ev.skipped}
    if not is_main():  # process 0 reports the merged numbers
        return 0
    if args.out:
        (storage.as_path(args.out) / METRICS_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    if args.json:
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(ev, f"ualm eval: {ev.prompts} prompts ({args.prompts}), checkpoint "
                               f"{args.checkpoint}, cfg {args.cfg}, mean {ev.mean_seconds:.2f} s/clip"))
    return 0


def add_eval_parser(sub):
    """Adds `eval` to an argparse subparsers object; returns its parser."""
    from ualm_jax.infer.tasks import add_generation_args

    e = sub.add_parser(
        "eval", help="generate audio for prompts and score it (CLAP, FD, world match)",
        description="Every metric names the model that produced it. Guidance follows UALM: "
                    "logits = cfg*cond + (1-cfg)*uncond (--cfg 3.0 = s 2 in the c + s*(c-u) "
                    "convention; 1 = off).")
    e.add_argument("--prompts", required=True,
                   help="JSON lines {prompt, reference?, events?}; references relative to this file")
    e.add_argument("--clap", help="local transformers CLAP model directory (CLAP score)")
    e.add_argument("--fd-model", help="FD embedder: a local transformers audio model directory, "
                                      "or 'mel-stats' (weight-free, smoke tests only)")
    e.add_argument("--out", help=f"write the generated wavs and {METRICS_FILE} here")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    e.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts")
    add_generation_args(e, sampling=False)
    e.set_defaults(func=eval_command)
    return e
