"""Paths that may be local or on object storage (`gs://`, `s3://`), for everything a run reads or
writes. Local paths stay `pathlib.Path` (behaviour exactly as before); URLs become
`etils.epath.Path`, the path type Orbax and TFDS use, so the same code serves both.

Object storage has no append, no atomic directory rename and no free-disk figure; the helpers
here give each caller the one behaviour it needs (a rewritten log, a commit marker written last,
no disk check) instead of each caller testing for URLs.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import socket
import threading
import time
from typing import Iterable, Union

SCHEMES = ("gs://", "s3://")

# One client for gs:// everywhere: epath prefers TensorFlow's gfile when TF is importable, but
# gfile has no endpoint override, so the code the tests prove (fsspec/gcsfs, which honours
# STORAGE_EMULATOR_HOST) would not be the code that runs. epath reads this once, at its first
# path operation; this module is imported before any. gcsfs's bucket-layout probe needs a
# control-plane API that emulators do not serve.
os.environ.setdefault("EPATH_USE_TF", "false")
if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")



def _no_listing_cache() -> None:
    """gcsfs caches directory listings per process; a reader that polls for new checkpoints (or
    resumes after another process saved) must see objects written since its last listing."""
    try:
        import fsspec
    except ImportError:
        return
    for protocol in ("gs", "gcs", "s3"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()


class StorageError(ValueError):
    """A path cannot be reached, read or written; the message names the URL and credentials."""


AnyPath = Union[str, os.PathLike]


def is_url(path: AnyPath) -> bool:
    return str(path).startswith(SCHEMES)


def as_path(path: AnyPath):
    """pathlib.Path for local paths, epath.Path for gs:// and s3:// URLs."""
    if isinstance(path, pathlib.Path):
        return path
    if is_url(path):
        from etils import epath

        return epath.Path(str(path))
    if not isinstance(path, (str, os.PathLike)):  # an epath.Path of a URL already
        return path
    return pathlib.Path(path)


def absolute(path: AnyPath):
    """Local paths made absolute (Orbax misreads relative ones); URLs unchanged."""
    p = as_path(path)
    return p if is_url(p) else p.absolute()


def join(base: AnyPath, *parts: str) -> str:
    """A path under `base` as a string: "/"-joined for URLs, os.path.join for local paths."""
    base = os.fspath(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def resolve(path: str, folder: AnyPath) -> str:
    """`path` as written in a file of `folder` (a manifest, a prompts file): a URL or an
    absolute path as it is, a relative one joined to the folder."""
    if is_url(path) or os.path.isabs(path):
        return path
    return join(folder, path)


def dirname(path: AnyPath) -> str:
    """The folder of a file path or URL (URLs keep their scheme)."""
    path = os.fspath(path)
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def exists(path: AnyPath) -> bool:
    return as_path(path).exists() if is_url(path) else os.path.exists(path)


def remove(path: AnyPath) -> None:
    """Deletes a file or a whole folder (or URL prefix); nothing when it does not exist."""
    p = as_path(path)
    if is_url(path):
        if p.exists():
            p.rmtree() if p.is_dir() else p.unlink()
    elif os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.remove(p)


def open_file(path: AnyPath, mode: str = "rb"):
    """open() for local files (no etils import on the hot path), epath's open for URLs."""
    return as_path(path).open(mode) if is_url(path) else open(path, mode)


def write_json(path: AnyPath, obj) -> None:
    """Indented JSON with a final newline, to a local file or an object."""
    import json

    text = json.dumps(obj, indent=2) + "\n"
    if is_url(path):
        as_path(path).write_text(text)
        return
    with open(path, "w") as f:
        f.write(text)


def glob(folder: AnyPath, pattern: str) -> list[str]:
    """Sorted paths (as strings) in `folder` matching `pattern`."""
    import glob as globlib

    if is_url(folder):
        return sorted(str(p) for p in as_path(folder).glob(pattern))
    return sorted(globlib.glob(os.path.join(os.fspath(folder), pattern)))


@contextlib.contextmanager
def local_copy(path: AnyPath):
    """A local file to hand to libraries that read only local files (soundfile): the path itself,
    or a temporary copy of an object; None when it does not exist."""
    path = os.fspath(path)
    if not is_url(path):
        yield path if os.path.isfile(path) else None
        return
    src = as_path(path)
    if not src.exists():
        yield None
        return
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(path)[1]) as tmp:
        tmp.write(src.read_bytes())
        tmp.flush()
        yield tmp.name


def credential_source(path: AnyPath) -> str:
    """Which endpoint and credential variables a URL is reached with (for error messages)."""
    url = str(path)
    parts = []
    if url.startswith("gs://"):
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            parts.append(f"endpoint STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']}")
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            parts.append("credentials GOOGLE_APPLICATION_CREDENTIALS="
                         f"{os.environ['GOOGLE_APPLICATION_CREDENTIALS']}")
        else:
            parts.append("application default credentials (GOOGLE_APPLICATION_CREDENTIALS unset: "
                         "`gcloud auth application-default login` or the VM's service account)")
    elif url.startswith("s3://"):
        keys = [k for k in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL") if os.environ.get(k)]
        parts.append("credentials " + (", ".join(keys) if keys else "AWS default chain (no AWS_* set)"))
    return "; ".join(parts)


def _with_timeout(fn, timeout: float):
    """Runs fn in a daemon thread; object-store clients retry unreachable hosts for minutes."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


def probe_writable(path: AnyPath, timeout: float = 60.0):
    """Creates the directory and proves it writable with a small probe object (one per process),
    before anything is compiled. Fails with one line naming the URL and how it was reached."""
    p = as_path(path)
    probe = p / f".write_probe.{socket.gethostname()}.{os.getpid()}"

    def write_and_remove():
        p.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        if probe.read_text() != "ok":
            raise OSError("probe object read back differently")
        probe.unlink()

    try:
        _with_timeout(write_and_remove, timeout)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means "cannot write here"
        where = f" ({credential_source(p)})" if is_url(p) else ""
        what = "is not reachable" if isinstance(e, TimeoutError) else "is not writable"
        detail = e.strerror if isinstance(e, OSError) and e.strerror else _reason(e)
        raise StorageError(f"run dir {p} {what}: {detail}{where}") from e
    return p


def local_io_route(path: AnyPath, key: str) -> str:
    """Why a built dataset at a URL cannot be read in place, and the two ways that work."""
    return (f"{key}={path}: built ArrayRecord shards are read with local file I/O (Grain's "
            "reader cannot open gs:// or s3://); set data.stage_dir=LOCAL_DIR to copy the build "
            "to local disk at start, or mount the bucket with gcsfuse and give the mounted path")


def free_bytes(path: AnyPath):
    """Free disk under a local path; None on object storage (no such limit to check)."""
    return None if is_url(path) else shutil.disk_usage(as_path(path)).free


class LineLog:
    """An append-only text log (metrics.jsonl). Local files are appended line by line; object
    storage cannot append, so the whole object is rewritten at most every `flush_seconds` and at
    close (lines already in the object, e.g. of a resumed run, are kept)."""

    def __init__(self, path: AnyPath, flush_seconds: float = 30.0):
        self.path = as_path(path)
        self.remote = is_url(path)
        self.flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._dirty = False
        self._last_flush = time.monotonic()
        if self.remote and self.path.exists():
            self._lines = self.path.read_text().splitlines(keepends=True)

    def append(self, line: str) -> None:
        line = line if line.endswith("\n") else line + "\n"
        if not self.remote:
            with self.path.open("a") as f:
                f.write(line)
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.remote and self._dirty:
            self.path.write_text("".join(self._lines))
            self._dirty = False
            self._last_flush = time.monotonic()


def sha256(path: AnyPath, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def copy_file(src: AnyPath, dst: AnyPath, chunk: int = 1 << 24) -> None:
    """Streams one file between any two locations (local <-> object storage)."""
    s, d = as_path(src), as_path(dst)
    if not is_url(src) and not is_url(dst):
        shutil.copyfile(s, d)
        return
    with s.open("rb") as fi, d.open("wb") as fo:
        while block := fi.read(chunk):
            fo.write(block)


def files_under(root: AnyPath) -> list[str]:
    """Relative POSIX names of every file under root, sorted."""
    r = as_path(root)
    if not is_url(root):
        return sorted(p.relative_to(r).as_posix() for p in r.rglob("*") if p.is_file())
    root = str(r).split("://", 1)[1].rstrip("/")  # walk() yields bucket-relative folders
    out = []
    for dirpath, _, names in r.walk():
        sub = str(dirpath).split("://", 1)[-1].lstrip("/").removeprefix("gs/").removeprefix("s3/")
        sub = sub[len(root):].strip("/")
        out += [f"{sub}/{n}" if sub else n for n in names]
    return sorted(out)


def upload_tree(local_dir: AnyPath, dest: AnyPath, last: Iterable[str] = ()) -> None:
    """Copies a finished local folder to `dest`, writing the files named in `last` (commit
    markers: a manifest or a build report) only after everything else, so a reader that waits
    for the marker never sees a partial upload as complete."""
    local, remote = as_path(local_dir), as_path(dest)
    names = files_under(local)
    last = [n for n in last if n in names]
    for name in [n for n in names if n not in last] + last:
        target = remote / name
        if not is_url(dest):
            target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(local / name, target)


def download_tree(src: AnyPath, local_dir: AnyPath) -> list[str]:
    """Copies every file under a URL into a local folder; returns the relative names."""
    source, local = as_path(src), pathlib.Path(local_dir)
    names = files_under(source)
    for name in names:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        copy_file(source / name, local / name)
    return names
