"""`{{key}}` templates shared by the launchers (stdlib only)."""
from __future__ import annotations

import re


def render(template: str, values: dict) -> str:
    """`{{key}}` -> value; a line holding only `{{key}}` takes a block of lines (indented like
    the placeholder), none when the value is empty. Unknown keys fail loudly."""
    out = []
    for line in template.splitlines():
        m = re.fullmatch(r"(\s*)\{\{(\w+)\}\}\s*", line)
        if m:
            out += [m.group(1) + b for b in values[m.group(2)].splitlines()]
            continue
        out.append(re.sub(r"\{\{(\w+)\}\}", lambda k: str(values[k.group(1)]), line))
    return "\n".join(out) + "\n"
