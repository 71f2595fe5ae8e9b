"""One error path for every command: an expected failure is one stderr line and exit 2; anything
else (or --debug) keeps its traceback."""
from __future__ import annotations

import errno
import os
import sys


def expected_error(e: BaseException) -> str | None:
    """One line for an expected failure (a bad input file or field, a full disk, a permission, an
    unreachable path); None for anything else, which keeps its traceback."""
    from ualm_jax.config import ConfigError  # here, not at import: `ualm --help` stays light

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device" + (f" writing {e.filename}" if e.filename else "")
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        SafetensorError = ValueError
    if not isinstance(e, (ConfigError, OSError, ValueError, KeyError, SafetensorError)):
        return None
    text = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= 800 else text[:797] + "..."


def _is_closed_loop_echo(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def quiet_closed_loop_echoes() -> None:
    """After a failed save or read, orbax/tensorstore callbacks (and object-store clients' sessions
    at exit) may still reach an asyncio loop that is already closed, each printing an ignored
    'RuntimeError: Event loop is closed'. The error itself is reported once; those echoes are
    dropped (both hooks pass everything else on unchanged)."""
    if getattr(sys.unraisablehook, "quiet_closed_loop", False):
        return
    import threading

    unraisable, thread = sys.unraisablehook, threading.excepthook

    def unraisable_hook(args):
        if not _is_closed_loop_echo(args.exc_value):
            unraisable(args)

    def thread_hook(args):
        if not _is_closed_loop_echo(args.exc_value):
            thread(args)

    unraisable_hook.quiet_closed_loop = thread_hook.quiet_closed_loop = True
    sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


def debug_requested(args=None) -> bool:
    """`ualm --debug CMD ...` or UALM_DEBUG=1: errors keep their traceback."""
    return bool(getattr(args, "debug", False)) or \
        os.environ.get("UALM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
