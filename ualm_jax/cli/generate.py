"""`ualm generate`: text -> audio, audio -> caption, question -> answer, prompt -> reasoned reply;
one prompt from the flags or a JSON-lines file of them (batch mode)."""
from __future__ import annotations

import json

from ualm_jax.cli.args import add_generation_args

TASKS = ("text-to-audio", "caption", "answer", "reason")
# Tasks that write files: each prompt's default output name, numbered by line.
OUT_NAMES = {"text-to-audio": "sample_{:04d}.wav", "reason": "reply_{:04d}"}


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="text -> audio (with guidance) or audio -> caption",
                       description="Guidance follows UALM: logits = cfg*cond + (1-cfg)*uncond, so "
                       "--cfg 3.0 equals a scale s=2 in the c + s*(c-u) convention; 1.0 disables it.")
    g.add_argument("--task", required=True, choices=TASKS,
                   help="text-to-audio: a caption in, a .wav out; caption: a .wav in, text out; "
                   "answer: a question (with --audio for audio QA) in, text out; reason: a "
                   "prompt in, the multi-segment reply (text plans, audio, critiques) out")
    g.add_argument("--prompt", help="text-to-audio: the caption; answer: the question; reason: "
                   "the request")
    g.add_argument("--audio", help="caption: the clip; answer: the clip the question is about")
    g.add_argument("--out", help="text-to-audio: the .wav; reason: the reply's folder; with "
                   "--prompts: the output folder")
    g.add_argument("--prompts", help="batch mode: JSON lines with prompt/out or audio")
    g.add_argument("--out-dir", help="batch mode: the output folder (same as --out; default the "
                   "prompts file's folder)")
    add_generation_args(g)
    g.set_defaults(func=run)


def read_prompt_lines(prompts: str, out_dir: str | None, task: str) -> list[dict]:
    """The lines of a `--prompts` file for `task` (infer.prompts.read_prompts): captioning needs
    `audio`, the others `prompt`; tasks that write files (text-to-audio: a .wav; reason: a
    folder) get each line's `out` resolved inside `out_dir` (default the file's folder)."""
    from ualm_jax.infer.prompts import read_prompts

    return read_prompts(prompts, "audio" if task == "caption" else "prompt",
                        OUT_NAMES.get(task), out_dir)


def run(args) -> int:
    from ualm_jax.distributed import maybe_initialize

    maybe_initialize()  # a multi-host job decodes each batch over every host's devices
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    from ualm_jax.distributed import owns
    from ualm_jax.infer.decode import GenerationConfig
    from ualm_jax.infer.tasks import answer, caption, load, reason, text_to_audio

    task = args.task
    if args.prompts:  # batch mode: one output per JSON line, every file under one folder
        items = read_prompt_lines(args.prompts, args.out_dir or args.out, task)
    elif task in ("text-to-audio", "reason"):
        if not args.prompt or (task == "text-to-audio" and not args.out):
            raise ValueError(f"--task {task} needs --prompt TEXT"
                             + (" and --out FILE.wav" if task == "text-to-audio" else ""))
        items = [{"prompt": args.prompt, "out": args.out or "reason"}]
    elif task == "answer":
        if not args.prompt:
            raise ValueError("--task answer needs --prompt QUESTION (and --audio FILE.wav for "
                             "audio questions)")
        items = [{"prompt": args.prompt, "audio": args.audio}]
    else:
        if not args.audio:
            raise ValueError("--task caption needs --audio FILE.wav")
        items = [{"audio": args.audio}]
    m = load(args.checkpoint, args.tokenizer, args.codec, overrides=args.overrides)
    gen_cfg = GenerationConfig(max_new=args.max_new, cfg_scale=args.cfg, seed=args.seed,
                               top_k=args.top_k, audio_temperature=args.temperature,
                               max_audio_frames=args.max_audio_frames, uncond=args.uncond,
                               batch=args.batch_size)
    # What every output records (printed, and as OUT.json beside each file written).
    settings = {"checkpoint": m.checkpoint, "step": m.step, "task": task, "seed": args.seed,
                "cfg": args.cfg, "uncond": args.uncond, "top_k": args.top_k,
                "temperature": args.temperature, "max_new": args.max_new}

    def write_wave(out: Path, codes, record: dict) -> dict:
        out.parent.mkdir(parents=True, exist_ok=True)
        wave = m.codec.decode(codes) if len(codes) else np.zeros(1, np.float32)
        sf.write(out, wave, m.codec.sample_rate)
        record = {**record, "out": str(out), "frames": int(len(codes))}
        out.with_suffix(".json").write_text(json.dumps({**record, **settings}, indent=1) + "\n")
        return record

    if task in ("text-to-audio", "reason") and m.codec is None:
        raise ValueError("no codec to decode audio: pass --codec DIR or set data.codec")
    # Every process runs every batch (one program over all devices); each writes and prints the
    # outputs of its own lines (line i: process i mod processes).
    if task == "text-to-audio":
        codes = text_to_audio(m, [it["prompt"] for it in items], gen_cfg)
        for i, (it, c) in enumerate(zip(items, codes)):
            if owns(i):  # batch mode: `out` resolved (and checked) by read_prompt_lines
                print(json.dumps(write_wave(Path(it["out"]), c, {"prompt": it["prompt"]})))
    elif task == "reason":
        for i, (it, segs) in enumerate(zip(items, reason(m, [it["prompt"] for it in items], gen_cfg))):
            if not owns(i):
                continue
            folder, parts = Path(it["out"]), []
            for j, (kind, value) in enumerate(segs):
                if kind == "audio":
                    parts.append({"audio": write_wave(folder / f"segment_{j}.wav", value,
                                                      {"prompt": it["prompt"], "segment": j})["out"]})
                else:
                    parts.append({"text": value})
            folder.mkdir(parents=True, exist_ok=True)
            rec = {"prompt": it["prompt"], "segments": parts, **settings}
            (folder / "reply.json").write_text(json.dumps(rec, indent=1) + "\n")
            print(json.dumps(rec))
    else:
        from data_pipelines.features import load_audio

        waves = [load_audio(it["audio"]) if it.get("audio") else None for it in items]
        if task == "answer":
            texts = answer(m, [it["prompt"] for it in items], waves, gen_cfg)
        else:
            texts = caption(m, waves, gen_cfg)
        for i, (it, text) in enumerate(zip(items, texts)):
            if not owns(i):
                continue
            key = "answer" if task == "answer" else "caption"
            print(json.dumps({**{k: it[k] for k in ("prompt", "audio") if it.get(k)}, key: text,
                              **settings}) if args.prompts else text)
    return 0
