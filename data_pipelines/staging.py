"""Built datasets on object storage.

Grain reads ArrayRecord shards with local file I/O (`open()` of a gs:// path fails), so a build
in a bucket is used through one of two routes, chosen explicitly, never silently:
- `data.stage_dir=DIR`: each gs:// build is copied to local disk (DIR/<name>-<hash of the URL>)
  once, at start, and read from there; a copy that is complete is reused on the next start;
- a bucket mounted with gcsfuse (as MaxText documents for Grain), its mount path given as the
  entry's `path`: a local path, nothing to do here.
Writing a build to a bucket (`ualm data build --out gs://...`) builds locally, then uploads with
the build report last: a build without its report is incomplete and is refused when read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import ualm_jax.storage as storage

REPORT_FILE = "build_report.json"  # written last: its presence marks a complete build
STAGED_MARKER = ".staged.json"


def local_build_dir(path: str, stage_dir: str = "", key: str = "data.mixture[].path") -> str:
    """A built dataset's local folder: `path` itself when local, else its staged copy."""
    if not storage.is_url(path):
        return path
    if not stage_dir:
        raise ValueError(storage.local_io_route(path, key))
    remote = storage.as_path(path)
    if not (remote / REPORT_FILE).exists():
        raise FileNotFoundError(f"{path} holds no complete build (no {REPORT_FILE}; a build "
                                f"uploads it last): build it with `ualm data build ... --out {path}`")
    digest = hashlib.sha1(path.rstrip("/").encode()).hexdigest()[:12]
    local = os.path.join(os.path.abspath(stage_dir), f"{remote.name}-{digest}")
    report = (remote / REPORT_FILE).read_text()
    marker = os.path.join(local, STAGED_MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("report_sha1") == hashlib.sha1(report.encode()).hexdigest():
                return local  # complete copy of this very build
    os.makedirs(stage_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}.tmp-", dir=os.path.abspath(stage_dir))
    try:
        names = storage.download_tree(path, tmp)
        with open(os.path.join(tmp, STAGED_MARKER), "w") as f:
            json.dump({"url": path, "files": len(names),
                       "report_sha1": hashlib.sha1(report.encode()).hexdigest()}, f)
        if os.path.exists(local):  # an older copy of another build at this URL
            shutil.rmtree(local)
        try:
            os.rename(tmp, local)
        except OSError:  # another process on this host staged it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"staged {path} -> {local} ({len(names)} files)", flush=True)
    return local


def check_new_remote(url: str) -> None:
    """A bucket build is never overwritten: objects cannot be swapped in atomically, and stale
    shards of the old build would mix with the new ones."""
    if (storage.as_path(url) / REPORT_FILE).exists():
        raise FileExistsError(f"{url} already holds a build; write to a new --out or delete it first")


def upload_build(local_dir: str, url: str) -> None:
    """A finished local build -> the bucket, its report last."""
    check_new_remote(url)
    storage.upload_tree(local_dir, url, last=[REPORT_FILE])
