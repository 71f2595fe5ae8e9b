"""The one command line: `ualm <command> ...`."""
from __future__ import annotations

import argparse
import sys

from ualm_jax.config import ConfigError


def _bench(args) -> int:
    from ualm_jax.bench import bench_step, print_json

    if args.what == "export":
        from ualm_jax.bench import bench_export

        print_json(bench_export(args.model, args.workdir, args.format))
    if args.what == "step":
        print_json(bench_step(args.model, args.batch, args.seq, args.mesh, args.steps,
                              warmup=args.warmup, text_only=args.text_only,
                              microbatches=args.microbatches, overrides=args.set or [],
                              peak_tflops=args.peak_tflops))
    return 0


def _train(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.run_dir)
    if summary["preempted"]:
        print(f"stopped at step {summary['step']} (checkpoint saved); rerun the same command to resume")
    else:
        print(results_table(summary))
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
        lines.append(f"{t:<10} {a if a is None else f'{a:.4f}':>17} {b if b is None else f'{b:.4f}':>16}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ualm", description="Train, evaluate and export UALM models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a config")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--run-dir", required=True, help="where checkpoints, metrics and logs go")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    t.set_defaults(func=_train)

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

    n = sub.add_parser("inspect", help="tensor tree of a checkpoint / HF / exported directory")
    n.add_argument("path")
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=_inspect)

    from data_pipelines.cli_data import add_data_parser

    add_data_parser(sub)

    b = sub.add_parser("bench", help="benchmarks that print one JSON line per measurement")
    b.add_argument("what", choices=["step", "export"],
                   help="step: the real train step; export: peak memory of exporting a checkpoint")
    b.add_argument("--workdir", default="runs/bench-export", help="export: where checkpoints go")
    b.add_argument("--format", default="pytorch", choices=["pytorch", "hf-text"], help="export format")
    b.add_argument("--model", default="tiny", help="model preset: tiny, 0.5b, 1.5b, 7b")
    b.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    b.add_argument("--seq", type=int, default=128, help="sequence length")
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
