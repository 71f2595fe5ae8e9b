"""`ualm dpo make-pairs`: DPO preference pairs from a checkpoint's own samples
(ualm_jax/recipes/make_pairs.py)."""
from __future__ import annotations

from ualm_jax.cli.args import add_generation_args

# make_pairs.JUDGE_HELP's choices; that module imports JAX, which `ualm --help` must not.
JUDGE_HELP = ("'builtin' (the procedural world's DSP judge, data_pipelines.demo.analyser) or "
              "'clap:DIR' (a local transformers CLAP model directory)")


def add_parser(sub) -> None:
    d = sub.add_parser("dpo", help="DPO data: preference pairs from a model's own samples")
    dsub = d.add_subparsers(dest="dpo_command", required=True)
    p = dsub.add_parser(
        "make-pairs", help="sample N clips per prompt, judge them, keep best/worst as a pair",
        description="Writes OUT/pairs.jsonl (for `ualm data build preference`), OUT/chosen.jsonl "
                    "(captions manifest of the winners, for the adaptation SFT), the wavs and "
                    "OUT/make_pairs_report.json. Guidance follows UALM: logits = cfg*cond + "
                    "(1-cfg)*uncond (--cfg 3.0 = s 2 in the c + s*(c-u) convention; 1 = off).")
    p.add_argument("--prompts", required=True, help="JSON lines with at least {\"prompt\": text}")
    p.add_argument("--samples", type=int, required=True, help="samples per prompt (>= 2)")
    p.add_argument("--judge", required=True, help=JUDGE_HELP)
    p.add_argument("--threshold", type=float, default=0.1,
                   help="keep a pair only when best - worst score >= this (ties never)")
    p.add_argument("--out", default="dpo_pairs", help="output folder")
    add_generation_args(p)
    p.add_argument("--min-seconds", type=float, default=0.1,
                   help="shorter samples are not paired (the preference builder's minimum)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ualm_jax.distributed import is_main, maybe_initialize
    from ualm_jax.recipes.make_pairs import REPORT_FILE, make_pairs

    maybe_initialize()  # a multi-host job: every host generates, each judges its own prompts
    report = make_pairs(args.checkpoint, args.prompts, args.samples, args.judge, args.out,
                        threshold=args.threshold, cfg_scale=args.cfg, seed=args.seed,
                        tokenizer=args.tokenizer, codec=args.codec, max_new=args.max_new,
                        max_audio_frames=args.max_audio_frames, temperature=args.temperature,
                        top_k=args.top_k, batch_size=args.batch_size, min_seconds=args.min_seconds,
                        uncond=args.uncond, overrides=args.overrides)
    if not is_main():  # process 0 merged and reports
        return 0
    reasons = ", ".join(f"{k} {n}" for k, n in report["skipped_by_reason"].items())
    print(f"make-pairs: {report['prompts']} prompts x {report['samples_per_prompt']} samples -> "
          f"{report['pairs']} pairs, {report['skipped']} skipped{f' ({reasons})' if reasons else ''}"
          f"; judge {report['judge']}")
    print(f"report: {Path(args.out) / REPORT_FILE}")
    print(f"next: {report['build_command']}")
    return 0
