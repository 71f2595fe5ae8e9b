"""The one command line: `ualm <command> ...`."""
from __future__ import annotations

import argparse
import sys

from ualm_jax.config import ConfigError


def _bench(args) -> int:
    from ualm_jax.bench import bench_step, print_json

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
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ualm", description="Train, evaluate and export UALM models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a config")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--run-dir", required=True, help="where checkpoints, metrics and logs go")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="benchmarks that print one JSON line per measurement")
    b.add_argument("what", choices=["step"], help="step: the real train step")
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ualm: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
