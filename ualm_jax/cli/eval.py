"""`ualm eval`: generate audio for a prompts file and score it (ualm_jax/eval/generation.py)."""
from __future__ import annotations

import json
import sys

from ualm_jax.cli.args import add_generation_args


def add_parser(sub) -> None:
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
    # eval_metrics.json: ualm_jax.eval.generation.METRICS_FILE, not imported to keep --help light
    e.add_argument("--out", help="write the generated wavs and eval_metrics.json here")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    e.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts")
    add_generation_args(e, sampling=False)
    e.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import ualm_jax.storage as storage
    from ualm_jax.distributed import is_main, maybe_initialize
    from ualm_jax.eval.generation import (METRICS_FILE, format_table, generation_eval, make_clap,
                                          make_fd_embedder)
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
