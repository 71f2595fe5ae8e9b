"""SIGTERM before the train loop owns it: `ualm train` calls `install()` before its heavy imports,
so a termination during imports and set-up is recorded instead of killing the process (exit 143
with nothing saved). The loop's preemption check reads `requested()` and stops before the first
step. Standard library only: importing this module must cost nothing."""
from __future__ import annotations

import signal

_requested = False
_previous = None  # the handler install() replaced; restore() puts it back


def _handler(signum, frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    """Records SIGTERM from now on (main thread only; elsewhere a no-op)."""
    global _requested, _previous
    _requested = False
    try:
        old = signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread
        return
    if old is not _handler:
        _previous = old


def restore() -> None:
    """Puts back the handler install() replaced and forgets any recorded request."""
    global _requested, _previous
    _requested = False
    if _previous is not None:
        try:
            signal.signal(signal.SIGTERM, _previous)
        except ValueError:
            return
        _previous = None


def requested() -> bool:
    return _requested
