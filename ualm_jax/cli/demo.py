"""`ualm demo`: procedural world -> tiny UALM on 8 devices -> evaluation, plots, export."""
from __future__ import annotations

from ualm_jax.cli.args import add_overrides


def add_parser(sub) -> None:
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
    d.set_defaults(func=run)


def run(args) -> int:
    from ualm_jax.distributed import maybe_initialize

    maybe_initialize()
    from ualm_jax.demo import run_demo

    run_demo(args.run_dir, args.config, args.overrides, clips=args.clips, problems=args.problems,
             eval_items=args.eval_items, export=not args.no_export)
    return 0
