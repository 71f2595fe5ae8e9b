"""The one command line: `ualm <command> ...`."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys

import ualm_jax.sigterm as sigterm
from ualm_jax import __version__
from ualm_jax.cli_args import add_checkpoint, add_overrides
from ualm_jax.config import ConfigError


def _bench(args) -> int:
    from ualm_jax.bench import bench_step, print_json

    if args.config and args.what not in ("data", "compile"):  # never silently benched the preset
        print(f"ualm bench: error: bench {args.what} does not take --config (only data and "
              f"compile do): pick the model with --model PRESET and KEY=VALUE overrides",
              file=sys.stderr)
        return 2
    if args.what == "compile":
        from ualm_jax.bench_compile import TpuCompileUnavailable, bench_compile

        try:  # --config and its overrides resolved as `ualm train` does; the flags win
            rec = bench_compile(args.model, args.topology, batch=args.batch, seq=args.seq,
                                mesh=args.mesh, microbatches=args.microbatches,
                                overrides=args.overrides, text_only=args.text_only,
                                config=args.config)
        except TpuCompileUnavailable as e:
            print(f"ualm bench: error: {e}", file=sys.stderr)
            return 2
        print_json(rec)
        return 0
    args.model = args.model or "tiny"
    args.microbatches = args.microbatches or 1
    if args.what == "data":
        from data_pipelines.bench_data import bench_data, bench_data_from_config

        if args.config:
            from ualm_jax.config import load_config

            cfg = load_config(args.config, args.overrides)
            print_json(bench_data_from_config(cfg, args.seconds))
        else:  # in-memory records at the paper's shapes (no build needed)
            print_json(bench_data(batch_size=args.batch or 8, seq_len=args.seq or 4096,
                                  seconds=args.seconds))
    if args.what == "export":
        from ualm_jax.bench import bench_export

        print_json(bench_export(args.model, args.out, args.format))
    if args.what == "import":
        from ualm_jax.bench import bench_import

        print_json(bench_import(args.model, args.out))
    if args.what == "decode":
        from ualm_jax.bench import bench_decode

        print_json(bench_decode(args.model, args.batch or 8, args.prompt_len, args.max_new,
                                args.mesh, args.devices, args.cfg, args.steps,
                                host_loop=not args.no_host_loop, overrides=args.overrides))
    if args.what == "step":
        print_json(bench_step(args.model, args.batch or 8, args.seq or 128, args.mesh, args.steps,
                              warmup=args.warmup, text_only=args.text_only,
                              microbatches=args.microbatches, overrides=args.overrides,
                              peak_tflops=args.peak_tflops))
    return 0


def _train(args) -> int:
    from ualm_jax.distributed import maybe_initialize

    maybe_initialize()  # before anything touches devices; a no-op on a single host
    from ualm_jax.config import load_config
    from ualm_jax.eval.hooks import eval_hooks
    from ualm_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    if args.topology and not args.dry_run:
        raise ValueError(f"--topology {args.topology} only sizes a run without training it: "
                         "add --dry-run")
    if args.dry_run:
        from ualm_jax.bench_compile import TpuCompileUnavailable, dry_run, format_dry_run

        try:  # with --topology: the same compile as `ualm bench compile --config`, no data read
            rec = dry_run(cfg, args.topology, args.config, args.overrides)
        except TpuCompileUnavailable as e:
            print(f"ualm train: error: {e}", file=sys.stderr)
            return 2
        print(format_dry_run(rec))
        return 1 if rec.get("fits") is False else 0  # a check: a step that cannot fit fails it
    if not args.run_dir:
        raise ConfigError("ualm train needs --run-dir DIR (or --dry-run to check the setup "
                          "without writing anything)")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after {args.stop_after}: expected a number of steps >= 1")
    summary = train(cfg, args.run_dir, hooks=eval_hooks(cfg), max_steps_this_run=args.stop_after,
                    reset_data_state=args.reset_data_state)
    if summary.get("nothing_trained"):
        print("rerun the same command to train")
    elif summary["preempted"]:
        print(f"stopped at step {summary['step']} (checkpoint saved); rerun the same command to resume")
    else:
        print(results_table(summary))
    return 0


def _config_show(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.describe import describe_config

    cfg = load_config(args.config, args.overrides)
    info = describe_config(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), **info}, indent=1))
        return 0
    print(cfg.to_yaml().rstrip())
    print(f"# parameters: {info['parameters']['total']:,} total, "
          f"{info['parameters']['trainable']:,} trained in train.stage={cfg.train.stage}")
    for part, n in info["parameters"]["by_part"].items():
        print(f"#   {part:<14} {n:>15,}")
    print(f"# batch spec ({cfg.train.batch_size} rows, data.source={cfg.data.source}):")
    for key, (shape, dtype) in info["batch_spec"].items():
        print(f"#   {key:<15} {str(shape):<24} {dtype}")
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
    last = summary.get("last_logged") or {}
    if "reward_accuracy" in last:  # DPO: no held-out eval; the first and last logged windows
        lines = [f"DPO results after {summary['step']} steps ({summary['run_dir']})",
                 f"{'metric':<16} {'first logged':>13} {'last logged':>12}"]
        for key in ("dpo_loss", "reward_accuracy", "reward_margin", "chosen_ce", "loss"):
            if key in last:
                a, b = first.get(key, float("nan")), last[key]
                lines.append(f"{key:<16} {a:>13.4f} {b:>12.4f}")
    return "\n".join(lines)


def _import_hf(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.convert.hf_import import import_hf

    overrides = list(args.overrides)
    # Never invent an encoder: with neither a Whisper checkpoint nor a config that asks for one,
    # the import is a text-only UALM (audio output streams, no audio input).
    asked = args.config or args.whisper or any(o.startswith("model.audio_encoder") for o in overrides)
    if not asked:
        overrides.append("model.audio_encoder.enabled=false")
    cfg = load_config(args.config, overrides)
    report = import_hf(args.hf_dir, args.out, cfg, whisper_dir=args.whisper)
    print(f"imported {report['tensors']} tensors from {args.hf_dir} into {args.out} "
          f"(tied source: {report['tied_source']}; unread: {len(report['unread_tensors'])})")
    enc = cfg.model.audio_encoder
    if not enc.enabled:
        print("audio encoder: none (a text-only UALM with audio output streams); pass --whisper "
              "DIR (a Whisper / Audio Flamingo 3 checkpoint) or --config FILE for audio input")
    elif not args.whisper:
        print(f"audio encoder: randomly initialised ({enc.n_layers} layers x {enc.d_model}, "
              f"{'frozen' if enc.frozen else 'trained'}) because no --whisper DIR was given")
    return 0


def _import_reference(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.convert.reference import import_reference

    cfg = load_config(args.config, args.overrides)
    report = import_reference(args.source, args.out, cfg)
    print(f"imported {report['imported']} tensors from {report['source']} into {args.out} "
          f"({report['codec']})")
    return 0


def _export(args) -> int:
    from ualm_jax.convert.export import export

    out = export(args.checkpoint, args.out, args.format, dtype=args.dtype,
                 torch_bin=args.torch_bin, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} as {args.format} to {out}")
    return 0


def _inspect(args) -> int:
    from ualm_jax.convert.inspect_tree import inspect, render, to_json

    info = inspect(args.checkpoint)
    print(to_json(info) if args.json else render(info))
    return 0


def _generate(args) -> int:
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


def read_prompt_lines(prompts: str, out_dir: str | None, task: str) -> list[dict]:
    """The JSON lines of a `--prompts` file. Paths in a line (`audio`, `out`) are relative to the
    prompts file's folder. For tasks that write files (text-to-audio: a .wav; reason: a folder)
    each line's `out` (default sample_NNNN.wav / reply_NNNN, NNNN counting lines) is resolved
    inside `out_dir`, else inside the prompts file's folder; an absolute `out` or one that leaves
    that folder is refused, as are two lines writing one file. Errors name the file and line."""
    import os
    from pathlib import Path

    outputs = task in ("text-to-audio", "reason")
    here = Path(prompts).parent
    base = Path(out_dir) if out_dir else here
    items, seen = [], {}
    for lineno, line in enumerate(Path(prompts).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{prompts}:{lineno}"
        try:
            it = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object: {e}") from None
        if not isinstance(it, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(it).__name__}")
        need = "audio" if task == "caption" else "prompt"
        if not isinstance(it.get(need), str):
            raise ValueError(f"{where}: needs a {need!r} string")
        if isinstance(it.get("audio"), str) and not os.path.isabs(it["audio"]):
            it = dict(it, audio=str(here / it["audio"]))
        if outputs:
            default = f"sample_{len(items):04d}.wav" if task == "text-to-audio" else f"reply_{len(items):04d}"
            out = it.get("out", default)
            if not isinstance(out, str) or not out.strip():
                raise ValueError(f"{where}: out={out!r} must be a non-empty file name")
            norm = os.path.normpath(out)
            if os.path.isabs(out):
                raise ValueError(f"{where}: out={out!r} is absolute; give a path inside {base} "
                                 "(the --out-dir, default the prompts file's folder)")
            if norm in (".", "..") or norm.startswith(".." + os.sep):
                raise ValueError(f"{where}: out={out!r} leaves {base} (the --out-dir, default the "
                                 "prompts file's folder)")
            if norm in seen:
                raise ValueError(f"{where}: out={out!r} is also written by line {seen[norm]}")
            seen[norm] = lineno
            it = dict(it, out=str(base / norm))
        items.append(it)
    return items


def _mixture(args) -> int:
    from ualm_jax.config import load_config

    if args.mixture_command == "inspect":
        from data_pipelines.inspect_mixture import format_inspect, inspect_mixture, to_json

        config, resume = args.config, None
        if args.resume_from:
            from ualm_jax.checkpoint import read_data_state, resolve
            from ualm_jax.train.data import local_data_state

            config = config or str(resolve(args.resume_from, verify=False)[0])
            step, saved = read_data_state(args.resume_from)
            if saved is None:
                raise ValueError(f"{args.resume_from}: checkpoint step {step} holds no "
                                 "data-iterator state")
            resume = (step, local_data_state(saved))  # every row, merged over the processes
        if config is None:
            raise ValueError("mixture inspect needs --config (or --resume-from RUN, whose "
                             "config.yaml it then reads)")
        result = inspect_mixture(load_config(config, args.overrides), args.batches, resume=resume)
        print(to_json(result) if args.json else format_inspect(result))
    elif args.mixture_command == "eval":
        from ualm_jax.eval.mixture_eval import evaluate_mixture, format_table, to_json

        result = evaluate_mixture(args.config, args.checkpoint, args.batches, args.overrides)
        print(to_json(result) if args.json else format_table(result))
    else:
        from ualm_jax.recipes.mixture_sweep import format_sweep, sweep

        result = sweep(args.config, args.out, args.blends, args.samples, args.seed,
                       args.concentration, args.steps, args.objective, args.fit, args.parallel,
                       args.eval_batches, args.verify, args.only, args.overrides)
        if args.only is None:
            print(json.dumps(result["fit"], indent=1) if args.json else format_sweep(result))
    return 0


def _add_mixture_parser(sub) -> None:
    m = sub.add_parser("mixture", help="inspect a config's data mixture; evaluate a checkpoint on "
                       "it; sweep candidate blends")
    msub = m.add_subparsers(dest="mixture_command", required=True)
    i = msub.add_parser("inspect", help="per task: data available, target vs realised token "
                        "share, epochs at the run length, packing efficiency; one packed row")
    i.add_argument("--config", default=None, help="YAML config with data.source=mixture or seqio "
                   "(default with --resume-from: the run's config.yaml)")
    i.add_argument("--resume-from", default=None, metavar="RUN",
                   help="a run (or step folder) of a Grain mixture: report its position (examples "
                   "consumed per task, epochs) and measure the batches it trains on next")
    i.add_argument("--batches", type=int, default=20, help="packed batches to measure")
    i.add_argument("--json", action="store_true", help="one JSON object with a `tasks` list")
    add_overrides(i)
    i.set_defaults(func=_mixture)
    e = msub.add_parser("eval", help="per-task held-out loss and token accuracy of a checkpoint")
    e.add_argument("--config", required=True, help="YAML config with data.source=mixture or seqio")
    e.add_argument("--checkpoint", required=True, help="run directory or one step directory")
    e.add_argument("--batches", type=int, default=None,
                   help="held-out batches (default: train.eval_batches, else 8)")
    e.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    add_overrides(e)
    e.set_defaults(func=_mixture)
    w = msub.add_parser("sweep", help="which blend to train on: one short proxy run per candidate "
                        "blend (same seed and init), per-task held-out loss, a regression on the "
                        "shares and its predicted best blend")
    w.add_argument("--config", required=True, help="YAML config with data.source=mixture (its "
                   "shares centre the sampled blends)")
    w.add_argument("--out", required=True, help="sweep directory (a rerun skips finished blends)")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--blends", default=None, help="YAML list of blends ({name, shares: {task: "
                     "share}}); default: sample them")
    src.add_argument("--samples", type=int, default=None,
                     help="blends drawn from a Dirichlet around the config's shares, plus the "
                     "config's own blend (default 6)")
    w.add_argument("--seed", type=int, default=0, help="seed of the sampled blends and the search")
    w.add_argument("--concentration", type=float, default=2.0,
                   help="Dirichlet concentration (alpha = concentration x shares; lower = wider)")
    w.add_argument("--steps", type=int, default=None, help="steps per proxy run (default train.steps)")
    w.add_argument("--objective", default="mean",
                   help="what the best blend minimises: mean (of per-task held-out losses) or "
                   "task=weight,... (e.g. text_sft=2,t2a=1)")
    w.add_argument("--fit", default="loglinear", choices=("loglinear", "linear"),
                   help="per-task regression: loglinear (log loss linear in the shares) or linear")
    w.add_argument("--eval-batches", type=int, default=None,
                   help="held-out batches per task (default train.eval_batches, else 4)")
    w.add_argument("--parallel", type=int, default=1,
                   help="blends trained at once, each in its own process (1: one after another "
                   "in this process)")
    w.add_argument("--verify", action="store_true",
                   help="also train the predicted best blend and report measured vs predicted")
    w.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one blend (a --parallel worker)
    w.add_argument("--json", action="store_true", help="print fit.json instead of the table")
    add_overrides(w)
    w.set_defaults(func=_mixture)


def build_parser() -> argparse.ArgumentParser:
    from ualm_jax.infer.tasks import add_generation_args

    p = argparse.ArgumentParser(prog="ualm", description="Train, evaluate and export UALM models.",
                                epilog="An expected failure (a bad input file or field, a full "
                                "disk, a permission, an unreachable path) prints one line naming "
                                "the file or key and exits with 2; --debug shows its traceback.")
    p.add_argument("--debug", action="store_true",
                   help="errors keep their full traceback (also UALM_DEBUG=1)")
    p.add_argument("--version", action="version", version=f"ualm-jax {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a config")
    t.add_argument("--config", default=None,
                   help="YAML config (see configs/; default: the built-in defaults)")
    t.add_argument("--run-dir", "--out", dest="run_dir", default=None,
                   help="where checkpoints, metrics and logs go: a local folder or gs://BUCKET/PATH")
    t.add_argument("--dry-run", action="store_true",
                   help="resolve the config, build the model, open the data, compile the train "
                        "step and report its memory; write nothing")
    t.add_argument("--topology", default=None,
                   help="with --dry-run: compile for this TPU slice instead of the local devices "
                        "(v5p-128, v5e-8, v5p:4x4x4; needs libtpu, not a TPU) or cpu:N, and "
                        "report per-chip memory against its HBM (exit 1 if it does not fit); "
                        "reads no data")
    t.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="train at most this many steps in this invocation, save a checkpoint and "
                        "exit (e.g. to fit a job's time slot); rerunning continues the run")
    t.add_argument("--reset-data-state", action="store_true",
                   help="resume parameters and optimiser from the run dir's latest checkpoint "
                        "but start the data stream afresh (e.g. after changing train.batch_size, "
                        "which the saved stream position cannot follow)")
    add_overrides(t)
    t.set_defaults(func=_train)

    c = sub.add_parser("config", help="show a resolved config")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="the resolved config (YAML), parameter counts and the "
                         "batch spec of a config plus overrides")
    cs.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    cs.add_argument("--json", action="store_true", help="one JSON object instead of YAML + tables")
    add_overrides(cs)
    cs.set_defaults(func=_config_show)

    d = sub.add_parser("demo", help="the built-in default: procedural audio world -> tiny UALM "
                       "trained on 8 devices -> evaluation table, plots, PyTorch export")
    d.add_argument("--run-dir", "--out", dest="run_dir", default="runs/demo",
                   help="where the world, the data, the run and the report go")
    d.add_argument("--config", default="configs/demo.yaml", help="the demo's config")
    d.add_argument("--clips", type=int, default=800, help="clips in the procedural world")
    d.add_argument("--problems", type=int, default=4000, help="text-only problems in the world")
    d.add_argument("--eval-items", type=int, default=32, help="held-out items per task to generate")
    d.add_argument("--no-export", action="store_true", help="skip the PyTorch export at the end")
    add_overrides(d)
    d.set_defaults(func=_demo)

    i = sub.add_parser("import-hf", help="a local HF Qwen2/Qwen2.5 checkpoint -> UALM params")
    i.add_argument("hf_dir", help="local folder with config.json and *.safetensors")
    i.add_argument("--out", required=True, help="new directory (usable as train.init_from)")
    i.add_argument("--config", default=None, help="UALM config for K, C, encoder, adapter, ...")
    i.add_argument("--whisper", default=None,
                   help="local Whisper / Audio Flamingo 3 checkpoint for the audio encoder")
    add_overrides(i)
    i.set_defaults(func=_import_hf)

    r = sub.add_parser("import-reference",
                       help="a checkpoint of the authors' PyTorch UALM -> UALM params")
    r.add_argument("source", help="mp_rank_00_model_states.pt, a DeepSpeed global_stepN/ folder, "
                   "a `--format ualm-reference` or `--format pytorch` export")
    r.add_argument("--config", required=True,
                   help="UALM config of the same model (backbone, K, C, encoder; data.codec)")
    r.add_argument("--out", required=True, help="new directory (usable as train.init_from)")
    add_overrides(r)
    r.set_defaults(func=_import_reference)

    e = sub.add_parser("export", help="a checkpoint -> PyTorch safetensors / HF text model / "
                       "the authors' UALM format")
    add_checkpoint(e, "run directory (latest checkpoint) or one step directory")
    e.add_argument("--format", default="pytorch", choices=["pytorch", "hf-text", "ualm-reference"],
                   help="pytorch: our names in safetensors; hf-text: the text Qwen2 only; "
                   "ualm-reference: mp_rank_00_model_states.pt + train.yaml for the authors' code")
    e.add_argument("--out", required=True, help="new export folder (or gs:// URL)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast tensors (default: as stored)")
    e.add_argument("--torch-bin", action="store_true", help="also write torch.load-able pytorch_model.bin")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="text -> audio (with guidance) or audio -> caption",
                       description="Guidance follows UALM: logits = cfg*cond + (1-cfg)*uncond, so "
                       "--cfg 3.0 equals a scale s=2 in the c + s*(c-u) convention; 1.0 disables it.")
    g.add_argument("--task", required=True, choices=["text-to-audio", "caption", "answer", "reason"],
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
    g.set_defaults(func=_generate)

    n = sub.add_parser("inspect", help="tensor tree of a checkpoint / HF / exported directory")
    add_checkpoint(n, "checkpoint (run or step directory), HF folder or export folder")
    n.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    n.set_defaults(func=_inspect)

    from data_pipelines.cli_data import add_data_parser

    add_data_parser(sub)
    _add_mixture_parser(sub)
    from ualm_jax.eval.cli_eval import add_eval_parser
    from ualm_jax.recipes.make_pairs import add_dpo_parser

    add_eval_parser(sub)
    add_dpo_parser(sub)

    b = sub.add_parser("bench", help="benchmarks that print one JSON line per measurement")
    b.add_argument("what", choices=["step", "decode", "export", "import", "data", "compile"],
                   help="step: the real train step; decode: text-to-audio decoding (the on-device "
                        "loop and the host-driven one); export: peak memory of exporting a checkpoint; "
                        "import: peak memory of `ualm import-hf` of a random HF checkpoint; "
                        "data: packed tokens/s of the data pipeline; compile: compile the train "
                        "step for --topology and report per-chip memory")
    b.add_argument("--topology", default="v5p-128",
                   help="compile: v5p-128, v4-32, v5e-8, v6e-16, a chip grid like v5p:4x4x4, or cpu:N")
    b.add_argument("--config", default=None,
                   help="data: a config whose data.mixture shards to read (default: in-memory "
                        "records at the paper's shapes, --batch x --seq); compile: the config "
                        "to compile, resolved with its KEY=VALUE overrides as `ualm train` does "
                        "(model, mesh, train.batch_size/seq_len/microbatches, remat, ...); the "
                        "other benches refuse it")
    b.add_argument("--seconds", type=float, default=5.0, help="data: seconds to measure")
    b.add_argument("--out", "--workdir", dest="out", default="runs/bench-export",
                   help="export/import: where checkpoints go")
    b.add_argument("--format", default="pytorch", choices=["pytorch", "hf-text"], help="export format")
    b.add_argument("--model", default=None,
                   help="model preset (default: tiny): tiny, 0.5b, 1.5b, 7b; compile: not "
                        "with --config (override model.preset=... instead)")
    b.add_argument("--batch", type=int, default=None,
                   help="global batch (sequences; step/data: 8, compile: one per data x fsdp "
                        "device, or with --config train.batch_size, which this overrides)")
    b.add_argument("--seq", type=int, default=None,
                   help="sequence length (default: step 128, data and compile 4096, compile "
                        "with --config train.seq_len, which this overrides)")
    b.add_argument("--mesh", default=None,
                   help="e.g. data=2,fsdp=2,tensor=2 (default: fsdp over all; compile with "
                        "--config: mesh.ici, which this overrides)")
    b.add_argument("--steps", type=int, default=5, help="timed steps (decode: timed generations)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    b.add_argument("--microbatches", type=int, default=None,
                   help="gradient accumulation steps (default 1; compile with --config: "
                        "train.microbatches, which this overrides)")
    b.add_argument("--text-only", action="store_true",
                   help="plain Qwen2 backbone: no audio streams, no audio ids, no encoder")
    b.add_argument("--peak-tflops", type=float, default=None,
                   help="peak bf16 TFLOP/s per device for MFU when the device is not known")
    b.add_argument("--prompt-len", type=int, default=32, help="decode: text ids per prompt")
    b.add_argument("--max-new", type=int, default=128, help="decode: positions per prompt")
    b.add_argument("--cfg", type=float, default=1.0,
                   help="decode: guidance lambda (!= 1: a cond and an uncond row per prompt)")
    b.add_argument("--devices", type=int, default=None,
                   help="decode: use only the first N devices (default all)")
    b.add_argument("--no-host-loop", action="store_true",
                   help="decode: skip timing the host-driven reference loop")
    add_overrides(b)
    b.set_defaults(func=_bench)
    for parser in walk_parsers(p):
        raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
        parser.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
    return p


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, when it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings
                or action.default in (None, False, [], argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter keeping a description's own line breaks (lists of kinds)."""


def walk_parsers(parser):
    """The parser and every sub-command's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from walk_parsers(child)


def parse_args(parser, argv):
    """Parses `argv`; then --set joins the bare overrides (which may also follow options:
    `import-hf DIR --out X model.k=v`), --debug is accepted after the command, and --checkpoint
    fills the positional checkpoint (a bare `key=value` argparse put there is an override)."""
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:
        extra = [e for e in extra if e != "--debug"]
        args.debug = True
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _settle_args(parser, args)
    return args


def _settle_args(parser, args) -> None:
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + list(getattr(args, "set_overrides", None) or [])
    if hasattr(args, "checkpoint_flag"):
        pos, flag = args.checkpoint, args.checkpoint_flag
        if pos and flag and "=" in pos and hasattr(args, "overrides"):
            args.overrides.insert(0, pos)
            pos = None
        if pos and flag and pos != flag:
            parser.error(f"two checkpoints given: {pos} and --checkpoint {flag}")
        args.checkpoint = pos or flag
        if not args.checkpoint:
            parser.error(f"ualm {args.command}: a checkpoint is required (positional or --checkpoint)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if [a for a in argv if a != "--debug"][:1] == ["train"]:
        sigterm.install()  # first: SIGTERM during the imports below stops cleanly, not with 143
        try:
            return _main(argv)
        finally:
            sigterm.restore()
    return _main(argv)


def expected_error(e: BaseException) -> str | None:
    """One line for an expected failure (a bad input file or field, a full disk, a permission, an
    unreachable path); None for anything else, which keeps its traceback."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device" + (f" writing {e.filename}" if e.filename else "")
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        SafetensorError = ValueError
    if not isinstance(e, (ConfigError, OSError, ValueError, KeyError, SafetensorError)):
        return None
    text = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= 800 else text[:797] + "..."


def _is_closed_loop_echo(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def quiet_closed_loop_echoes() -> None:
    """After a failed save or read, orbax/tensorstore callbacks (and object-store clients' sessions
    at exit) may still reach an asyncio loop that is already closed, each printing an ignored
    'RuntimeError: Event loop is closed'. The error itself is reported once; those echoes are
    dropped (both hooks pass everything else on unchanged)."""
    if getattr(sys.unraisablehook, "quiet_closed_loop", False):
        return
    import threading

    unraisable, thread = sys.unraisablehook, threading.excepthook

    def unraisable_hook(args):
        if not _is_closed_loop_echo(args.exc_value):
            unraisable(args)

    def thread_hook(args):
        if not _is_closed_loop_echo(args.exc_value):
            thread(args)

    unraisable_hook.quiet_closed_loop = thread_hook.quiet_closed_loop = True
    sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


def debug_requested(args=None) -> bool:
    """`ualm --debug CMD ...` or UALM_DEBUG=1: errors keep their traceback."""
    return bool(getattr(args, "debug", False)) or \
        os.environ.get("UALM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _main(argv) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - expected failures become one line, the rest re-raise
        msg = expected_error(e)
        if msg is None or debug_requested(args):
            raise
        quiet_closed_loop_echoes()
        if isinstance(e, ConfigError):
            print(f"ualm: config error: {msg}", file=sys.stderr)
        else:
            print(f"ualm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
