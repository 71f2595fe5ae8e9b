"""`ualm config show`: the resolved config, its parameter counts and its batch spec."""
from __future__ import annotations

import json

from ualm_jax.cli.args import add_overrides


def add_parser(sub) -> None:
    c = sub.add_parser("config", help="show a resolved config")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="the resolved config (YAML), parameter counts and the "
                         "batch spec of a config plus overrides")
    cs.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    cs.add_argument("--json", action="store_true", help="one JSON object instead of YAML + tables")
    add_overrides(cs)
    cs.set_defaults(func=run)


def run(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.tools.describe import describe_config

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
