"""The argument conventions every `ualm` sub-command shares (imported by the modules that add
sub-commands): bare `key=value` overrides with --set as an alias, and a checkpoint given
positionally or as --checkpoint. `ualm_jax/cli.py` settles them after parsing."""
from __future__ import annotations


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
