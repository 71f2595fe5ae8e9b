"""`ualm train`: train (or resume) a run from a config; --dry-run checks it without writing."""
from __future__ import annotations

import sys

from ualm_jax.cli.args import add_overrides


def add_parser(sub) -> None:
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
    t.set_defaults(func=run)


def run(args) -> int:
    from ualm_jax.distributed import maybe_initialize

    maybe_initialize()  # before anything touches devices; a no-op on a single host
    from ualm_jax.config import ConfigError, load_config
    from ualm_jax.eval.hooks import eval_hooks
    from ualm_jax.train.loop import train
    from ualm_jax.train.summary import results_table

    cfg = load_config(args.config, args.overrides)
    if args.topology and not args.dry_run:
        raise ValueError(f"--topology {args.topology} only sizes a run without training it: "
                         "add --dry-run")
    if args.dry_run:
        from ualm_jax.train.dry_run import dry_run, format_dry_run
        from ualm_jax.train.topology_compile import TpuCompileUnavailable

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
