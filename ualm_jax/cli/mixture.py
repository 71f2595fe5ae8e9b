"""`ualm mixture inspect | eval | sweep`: a config's data mixture, a checkpoint's per-task loss on
it, and which blend to train on."""
from __future__ import annotations

import argparse
import json

from ualm_jax.cli.args import add_overrides


def add_parser(sub) -> None:
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
    i.set_defaults(func=run)
    e = msub.add_parser("eval", help="per-task held-out loss and token accuracy of a checkpoint")
    e.add_argument("--config", required=True, help="YAML config with data.source=mixture or seqio")
    e.add_argument("--checkpoint", required=True, help="run directory or one step directory")
    e.add_argument("--batches", type=int, default=None,
                   help="held-out batches (default: train.eval_batches, else 8)")
    e.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    add_overrides(e)
    e.set_defaults(func=run)
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
    w.set_defaults(func=run)


def run(args) -> int:
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
