"""The one command line: `ualm <command> ...`."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ualm_jax.config import ConfigError


def _bench(args) -> int:
    from ualm_jax.bench import bench_step, print_json

    if args.what == "compile":
        from ualm_jax.bench_compile import TpuCompileUnavailable, bench_compile

        try:
            rec = bench_compile(args.model, args.topology, batch=args.batch, seq=args.seq or 4096,
                                mesh=args.mesh, microbatches=args.microbatches,
                                overrides=args.set or [], text_only=args.text_only)
        except TpuCompileUnavailable as e:
            print(f"ualm bench: error: {e}", file=sys.stderr)
            return 2
        print_json(rec)
    if args.what == "data":
        from data_pipelines.bench_data import bench_data, bench_data_from_config

        if args.config:
            from ualm_jax.config import load_config

            cfg = load_config(args.config, args.set or [])
            print_json(bench_data_from_config(cfg, args.seconds))
        else:  # in-memory records at the paper's shapes (no build needed)
            print_json(bench_data(batch_size=args.batch or 8, seq_len=args.seq or 4096,
                                  seconds=args.seconds))
    if args.what == "export":
        from ualm_jax.bench import bench_export

        print_json(bench_export(args.model, args.workdir, args.format))
    if args.what == "step":
        print_json(bench_step(args.model, args.batch or 8, args.seq or 128, args.mesh, args.steps,
                              warmup=args.warmup, text_only=args.text_only,
                              microbatches=args.microbatches, overrides=args.set or [],
                              peak_tflops=args.peak_tflops))
    return 0


def _train(args) -> int:
    from ualm_jax.distributed import maybe_initialize

    maybe_initialize()  # before anything touches devices; a no-op on a single host
    from ualm_jax.config import load_config
    from ualm_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.run_dir)
    if summary["preempted"]:
        print(f"stopped at step {summary['step']} (checkpoint saved); rerun the same command to resume")
    else:
        print(results_table(summary))
    return 0


def _demo(args) -> int:
    from ualm_jax.distributed import maybe_initialize

    maybe_initialize()
    from ualm_jax.demo import run_demo

    run_demo(args.run_dir, args.config, args.overrides, clips=args.clips, problems=args.problems,
             eval_items=args.eval_items, export=not args.no_export)
    return 0


def results_table(summary: dict) -> str:
    """Per-task loss at the first logged step vs held-out loss at the end."""
    first, ev = summary.get("first_loss") or {}, summary.get("eval") or {}
    tasks = sorted({k.split("/", 1)[1] for k in first if k.startswith("loss/") and "stream" not in k}
                   | {k.split("/", 2)[2] for k in ev if k.startswith("eval/loss/")})
    lines = [f"results after {summary['step']} steps ({summary['run_dir']})",
             f"{'task':<10} {'first train loss':>17} {'final eval loss':>16}"]
    for t in tasks:
        a, b = first.get(f"loss/{t}"), ev.get(f"eval/loss/{t}")
        lines.append(f"{t:<10} {'-' if a is None else f'{a:.4f}':>17} {'-' if b is None else f'{b:.4f}':>16}")
    if ev:
        lines.append(f"{'all':<10} {first.get('loss', float('nan')):>17.4f} {ev['eval/loss']:>16.4f}"
                     f"   eval stream-0 accuracy {ev['eval/accuracy']:.3f}")
    return "\n".join(lines)


def _import_hf(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.convert.hf_import import import_hf

    cfg = load_config(args.config, args.overrides)
    report = import_hf(args.hf_dir, args.out, cfg, whisper_dir=args.whisper)
    print(f"imported {report['tensors']} tensors from {args.hf_dir} into {args.out} "
          f"(tied source: {report['tied_source']}; unread: {len(report['unread_tensors'])})")
    return 0


def _export(args) -> int:
    from ualm_jax.convert.export import export

    out = export(args.checkpoint, args.out, args.format, dtype=args.dtype,
                 torch_bin=args.torch_bin, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} as {args.format} to {out}")
    return 0


def _inspect(args) -> int:
    from ualm_jax.convert.inspect_tree import inspect, render, to_json

    info = inspect(args.path)
    print(to_json(info) if args.json else render(info))
    return 0


def _generate(args) -> int:
    import json
    from pathlib import Path

    import soundfile as sf

    from ualm_jax.infer.decode import GenerationConfig
    from ualm_jax.infer.tasks import caption, load, text_to_audio

    m = load(args.checkpoint, args.tokenizer, args.codec)
    gen_cfg = GenerationConfig(max_new=args.max_new, cfg_scale=args.cfg, seed=args.seed,
                               top_k=args.top_k, audio_temperature=args.temperature,
                               max_audio_frames=args.max_audio_frames)
    if args.prompts:  # batch mode: one output per JSON line
        items = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    elif args.task == "text-to-audio":
        if not args.prompt or not args.out:
            raise ValueError("--task text-to-audio needs --prompt TEXT and --out FILE.wav")
        items = [{"prompt": args.prompt, "out": args.out}]
    else:
        if not args.audio:
            raise ValueError("--task caption needs --audio FILE.wav")
        items = [{"audio": args.audio}]
    if args.task == "text-to-audio":
        if m.codec is None:
            raise ValueError("no codec to decode audio: pass --codec DIR or set data.codec")
        codes = text_to_audio(m, [it["prompt"] for it in items], gen_cfg)
        for i, (it, c) in enumerate(zip(items, codes)):
            out = Path(it.get("out") or Path(args.out_dir or ".") / f"sample_{i:04d}.wav")
            out.parent.mkdir(parents=True, exist_ok=True)
            sf.write(out, m.codec.decode(c) if len(c) else np.zeros(1, np.float32), m.codec.sample_rate)
            print(json.dumps({"prompt": it["prompt"], "out": str(out), "frames": int(len(c))}))
    else:
        from data_pipelines.features import load_audio

        texts = caption(m, [load_audio(it["audio"]) for it in items], gen_cfg)
        for it, text in zip(items, texts):
            print(json.dumps({"audio": it["audio"], "caption": text}) if args.prompts else text)
    return 0


def _mixture(args) -> int:
    from ualm_jax.config import load_config

    if args.mixture_command == "inspect":
        from data_pipelines.inspect_mixture import format_inspect, inspect_mixture, to_json

        result = inspect_mixture(load_config(args.config, args.overrides), args.batches)
        print(to_json(result) if args.json else format_inspect(result))
    else:
        from ualm_jax.eval.mixture_eval import evaluate_mixture, format_table, to_json

        result = evaluate_mixture(args.config, args.checkpoint, args.batches, args.overrides)
        print(to_json(result) if args.json else format_table(result))
    return 0


def _add_mixture_parser(sub) -> None:
    m = sub.add_parser("mixture", help="inspect a config's data mixture; evaluate a checkpoint on it")
    msub = m.add_subparsers(dest="mixture_command", required=True)
    i = msub.add_parser("inspect", help="per task: data available, target vs realised token "
                        "share, epochs at the run length, packing efficiency; one packed row")
    i.add_argument("--config", required=True, help="YAML config with data.source=mixture")
    i.add_argument("--batches", type=int, default=20, help="packed batches to measure")
    i.add_argument("--json", action="store_true", help="one JSON object with a `tasks` list")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    i.set_defaults(func=_mixture)
    e = msub.add_parser("eval", help="per-task held-out loss and token accuracy of a checkpoint")
    e.add_argument("--config", required=True, help="YAML config with data.source=mixture")
    e.add_argument("--checkpoint", required=True, help="run directory or one step directory")
    e.add_argument("--batches", type=int, default=None,
                   help="held-out batches (default: train.eval_batches, else 8)")
    e.add_argument("--json", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    e.set_defaults(func=_mixture)


def build_parser() -> argparse.ArgumentParser:
    from ualm_jax.infer.tasks import add_generation_args

    p = argparse.ArgumentParser(prog="ualm", description="Train, evaluate and export UALM models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a config")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--run-dir", required=True, help="where checkpoints, metrics and logs go")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    t.set_defaults(func=_train)

    d = sub.add_parser("demo", help="the built-in default: procedural audio world -> tiny UALM "
                       "trained on 8 devices -> evaluation table, plots, PyTorch export")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--config", default="configs/demo.yaml")
    d.add_argument("--clips", type=int, default=800, help="clips in the procedural world")
    d.add_argument("--problems", type=int, default=4000, help="text-only problems in the world")
    d.add_argument("--eval-items", type=int, default=32, help="held-out items per task to generate")
    d.add_argument("--no-export", action="store_true")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    d.set_defaults(func=_demo)

    i = sub.add_parser("import-hf", help="a local HF Qwen2/Qwen2.5 checkpoint -> UALM params")
    i.add_argument("hf_dir")
    i.add_argument("--out", required=True, help="new directory (usable as train.init_from)")
    i.add_argument("--config", default=None, help="UALM config for K, C, encoder, adapter, ...")
    i.add_argument("--whisper", default=None,
                   help="local Whisper / Audio Flamingo 3 checkpoint for the audio encoder")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    i.set_defaults(func=_import_hf)

    e = sub.add_parser("export", help="a checkpoint -> PyTorch safetensors / HF text model")
    e.add_argument("checkpoint", help="run directory (latest checkpoint) or one step directory")
    e.add_argument("--format", default="pytorch", choices=["pytorch", "hf-text"])
    e.add_argument("--out", required=True)
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast tensors (default: as stored)")
    e.add_argument("--torch-bin", action="store_true", help="also write torch.load-able pytorch_model.bin")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="text -> audio (with guidance) or audio -> caption",
                       description="Guidance follows UALM: logits = cfg*cond + (1-cfg)*uncond, so "
                       "--cfg 3.0 equals a scale s=2 in the c + s*(c-u) convention; 1.0 disables it.")
    g.add_argument("--task", required=True, choices=["text-to-audio", "caption"])
    g.add_argument("--prompt", help="caption to render as audio")
    g.add_argument("--audio", help="audio file to caption")
    g.add_argument("--out", help="output .wav (text-to-audio)")
    g.add_argument("--prompts", help="batch mode: JSON lines with prompt/out or audio")
    g.add_argument("--out-dir", help="batch mode: where .wav files go when a line has no out")
    add_generation_args(g)
    g.set_defaults(func=_generate)

    n = sub.add_parser("inspect", help="tensor tree of a checkpoint / HF / exported directory")
    n.add_argument("path")
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=_inspect)

    from data_pipelines.cli_data import add_data_parser

    add_data_parser(sub)
    _add_mixture_parser(sub)
    from ualm_jax.eval.cli_eval import add_eval_parser
    from ualm_jax.infer.make_pairs import add_dpo_parser

    add_eval_parser(sub)
    add_dpo_parser(sub)

    b = sub.add_parser("bench", help="benchmarks that print one JSON line per measurement")
    b.add_argument("what", choices=["step", "export", "data", "compile"],
                   help="step: the real train step; export: peak memory of exporting a checkpoint; "
                        "data: packed tokens/s of the data pipeline; compile: compile the train "
                        "step for --topology and report per-chip memory")
    b.add_argument("--topology", default="v5p-128",
                   help="compile: v5p-128, v4-32, v5e-8, v6e-16, a chip grid like v5p:4x4x4, or cpu:N")
    b.add_argument("--config", default=None,
                   help="data: a config whose data.mixture shards to read (default: in-memory "
                        "records at the paper's shapes, --batch x --seq)")
    b.add_argument("--seconds", type=float, default=5.0, help="data: seconds to measure")
    b.add_argument("--workdir", default="runs/bench-export", help="export: where checkpoints go")
    b.add_argument("--format", default="pytorch", choices=["pytorch", "hf-text"], help="export format")
    b.add_argument("--model", default="tiny", help="model preset: tiny, 0.5b, 1.5b, 7b")
    b.add_argument("--batch", type=int, default=None,
                   help="global batch (sequences; step/data: 8, compile: one per data x fsdp device)")
    b.add_argument("--seq", type=int, default=None,
                   help="sequence length (default: step 128, data and compile 4096)")
    b.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: fsdp over all)")
    b.add_argument("--steps", type=int, default=5, help="timed steps")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    b.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps")
    b.add_argument("--text-only", action="store_true",
                   help="plain Qwen2 backbone: no audio streams, no audio ids, no encoder")
    b.add_argument("--peak-tflops", type=float, default=None,
                   help="peak bf16 TFLOP/s per device for MFU when the device is not known")
    b.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. model.remat=dots model.loss_objective=consistent")
    b.set_defaults(func=_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may follow options (`import-hf DIR --out X model.k=v`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ualm: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ualm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
