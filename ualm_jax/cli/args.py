"""The argument conventions every `ualm` sub-command shares: bare `key=value` overrides with --set
as an alias, a checkpoint given positionally or as --checkpoint (both settled after parsing:
ualm_jax/cli/__init__.py), the generation flags, and help that shows each flag's default."""
from __future__ import annotations

import argparse
from dataclasses import fields

from ualm_jax.infer.generation_config import UNCOND, GenerationConfig


def add_overrides(p) -> None:
    """Dotted config overrides, bare (`key=value ...`, MaxText/Levanter style) or after --set."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. model.attention=xla mesh.ici.fsdp=8")
    p.add_argument("--set", nargs="+", dest="set_overrides", metavar="KEY=VALUE", default=None,
                   help="the same overrides after a flag (may be combined with bare ones)")


def add_checkpoint(p, text: str) -> None:
    """A checkpoint given positionally or as --checkpoint (both spellings everywhere)."""
    p.add_argument("checkpoint", nargs="?", default=None, help=text)
    p.add_argument("--checkpoint", dest="checkpoint_flag", default=None, help=text)


def add_generation_args(p, sampling: bool = True) -> None:
    """The flags `ualm generate`, `ualm eval` and `ualm dpo make-pairs` share; each default is
    GenerationConfig's, so the CLI and the Python API sample alike."""
    default = {f.name: f.default for f in fields(GenerationConfig)}
    p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or a step dir")
    p.add_argument("--cfg", type=float, default=default["cfg_scale"],
                   help="UALM guidance lambda (1 = off)")
    p.add_argument("--uncond", default=default["uncond"], choices=UNCOND,
                   help="unconditional prompt for guidance: ours = pad before <assistant>, "
                   "<assistant><audio> kept (what CFG dropout trains); reference = the authors' "
                   "code: pad through <assistant>, only <audio> kept")
    if sampling:
        p.add_argument("--top-k", type=int, default=default["top_k"],
                       help="audio sampling: the k most likely codes")
        p.add_argument("--temperature", type=float, default=default["audio_temperature"],
                       help="audio sampling temperature")
    p.add_argument("--max-new", type=int, default=default["max_new"],
                   help="decode positions per output")
    p.add_argument("--max-audio-frames", type=int, default=default["max_audio_frames"],
                   help="stop an audio output after this many codec frames")
    p.add_argument("--seed", type=int, default=default["seed"],
                   help="sampling seed (outputs repeat with it)")
    p.add_argument("--batch-size", type=int, default=default["batch"],
                   help="prompts per decode batch (outputs do not depend on it)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: data.tokenizer of the run)")
    p.add_argument("--codec", help="codec dir (default: data.codec of the run)")
    add_overrides(p)


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
