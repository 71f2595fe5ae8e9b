"""The one command line: `ualm <command> ...`, one module per command (each with `add_parser(sub)`
and `run(args)`; a command imports its library only when it runs, so `ualm --help` stays light)."""
from __future__ import annotations

import argparse
import sys

import ualm_jax.sigterm as sigterm
from ualm_jax import __version__
from ualm_jax.cli import bench, config, convert, data, demo, dpo, eval, generate, mixture, train
from ualm_jax.cli.args import HelpFormatter, RawDescriptionHelpFormatter, walk_parsers
from ualm_jax.cli.errors import debug_requested, expected_error, quiet_closed_loop_echoes
from ualm_jax.cli.generate import read_prompt_lines  # noqa: F401 - re-exported
from ualm_jax.train.summary import results_table  # noqa: F401 - re-exported

# In `ualm --help` order.
COMMANDS = (train, config, demo, convert, generate, data, mixture, eval, dpo, bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ualm", description="Train, evaluate and export UALM models.",
                                epilog="An expected failure (a bad input file or field, a full "
                                "disk, a permission, an unreachable path) prints one line naming "
                                "the file or key and exits with 2; --debug shows its traceback.")
    p.add_argument("--debug", action="store_true",
                   help="errors keep their full traceback (also UALM_DEBUG=1)")
    p.add_argument("--version", action="version", version=f"ualm-jax {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for parser in walk_parsers(p):
        raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
        parser.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
    return p


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
    elif extra:  # said by the command's own parser, whose usage lists the flags it takes
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    _settle_args(parser, args)
    return args


def _command_parser(parser, args):
    """The (sub-)command's parser that `args` chose."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            child = action.choices.get(getattr(args, action.dest, None))
            if child is not None:
                return _command_parser(child, args)
    return parser


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
        from ualm_jax.config import ConfigError  # here, not at import: `ualm --help` stays light

        if isinstance(e, ConfigError):
            print(f"ualm: config error: {msg}", file=sys.stderr)
        else:
            print(f"ualm {args.command}: error: {msg}", file=sys.stderr)
        return 2
