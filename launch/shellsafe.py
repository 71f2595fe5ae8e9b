"""Input checks and shell quoting shared by the launchers (stdlib only).

Every value a launcher writes into a shell line goes through `shlex.quote` (or `shell_path`,
which also keeps `~/` and `$VAR` expansion); values with control characters are refused before
anything is rendered, so no value can add a line to a script, a manifest or a remote command.
"""
from __future__ import annotations

import re
import shlex

# C0 controls (tab excepted), DEL, C1 controls, and the Unicode line/paragraph separators that
# str.splitlines() also breaks on.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def flag_name(dest: str) -> str:
    return "KEY=VALUE override" if dest == "overrides" else "--" + dest.replace("_", "-")


def reject_control_chars(args) -> None:
    """SystemExit with one line naming the flag when any string value (or list item) of the
    parsed arguments holds a control character such as a newline or carriage return."""
    for dest, value in vars(args).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and (m := _CONTROL.search(v)):
                raise SystemExit(f"{flag_name(dest)}: control character U+{ord(m.group()):04X} "
                                 f"in {v!r} is not allowed")


def shell_path(value: str, *, tilde: bool = False) -> str:
    """`value` as one shell word that expands nothing but `$NAME` / `${NAME}` (and a leading
    `~/` with `tilde`): `$(...)`, backquotes, globs, `;` and spaces stay literal."""
    head = ""
    if tilde and (value == "~" or value.startswith("~/")):
        head, value = value[:2], value[2:]  # the slash unquoted, or bash expands no `~`
    parts, pos = [], 0
    for m in _VAR.finditer(value):
        if m.start() > pos:
            parts.append(shlex.quote(value[pos:m.start()]))
        parts.append('"${%s}"' % (m.group(1) or m.group(2)))
        pos = m.end()
    if pos < len(value) or not (parts or head):
        parts.append(shlex.quote(value[pos:]))
    return head + "".join(parts)


def expand_vars(value: str, env: dict) -> str:
    """`$NAME` / `${NAME}` replaced from `env` as `shell_path` lets the shell do; an unset one
    stays as written."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group()), value)
