"""One trainer per run directory: a lease file (`RUN/.lease.json`: host, pid, start, heartbeat).

A second `ualm train` on the same directory (local or gs://) refuses, naming the holder. A lease
is taken over when its holder is gone: on this host when its pid no longer runs, from another
host when its heartbeat (refreshed every `heartbeat_s` by a daemon thread) is older than
`stale_s`. The processes of one multi-host job are one holder: process 0 holds the lease and
tells the others whether it got it, so all of them stop together.

Object storage has no create-if-absent through these clients, so two trainers started within
the same second could both read "free"; each re-reads the lease after writing it and the loser
stops, which narrows that window to the write's round trip.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time

import jax

import ualm_jax.storage as storage
from ualm_jax.config import ConfigError

LEASE_FILE = ".lease.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    started = dt.datetime.fromtimestamp(holder.get("started", 0)).isoformat(timespec="seconds")
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}"


class RunLease:
    def __init__(self, run_dir, heartbeat_s: float = 30.0, stale_s: float = 120.0):
        self.path = storage.as_path(run_dir) / LEASE_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread = None

    def _read(self):
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        self.path.write_text(json.dumps({**self.me, "heartbeat": time.time()}))

    def _mine(self, holder) -> bool:
        return bool(holder) and holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]

    def _refusal(self):
        """None when the lease may be taken, else why not."""
        holder = self._read()
        if not holder or self._mine(holder):
            return None
        if holder.get("host") == self.me["host"]:
            if _pid_alive(int(holder.get("pid", -1))):
                return holder
            print(f"run dir lease: taking over from a process that is gone ({_describe(holder)})",
                  flush=True)
            return None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age < self.stale_s:
            return holder
        print(f"run dir lease: taking over a stale lease ({_describe(holder)}, no heartbeat for "
              f"{age:.0f} s)", flush=True)
        return None

    def acquire(self) -> None:
        holder = self._refusal()
        if holder is None:
            self._write()
            if not self._mine(self._read()):  # another trainer wrote in between
                holder = self._read()
        if holder is not None:
            raise ConfigError(f"run dir {self.path.parent} is in use by another trainer "
                              f"({_describe(holder)}); stop it or choose another --run-dir "
                              f"(a lease whose holder died is taken over automatically)")
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed heartbeat only ages the lease
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:
                if self._mine(self._read()):
                    self.path.unlink()
            except OSError:
                pass


class hold:
    """`with hold(run_dir):` around a training run, for every process of the job."""

    def __init__(self, run_dir, **kw):
        self.lease = RunLease(run_dir, **kw) if jax.process_index() == 0 else None

    def __enter__(self):
        error = None
        if self.lease is not None:
            try:
                self.lease.acquire()
            except ConfigError as e:
                error = e
        if jax.process_count() > 1:  # one decision for the whole job
            import numpy as np
            from jax.experimental import multihost_utils

            refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if int(refused) and error is None:
                raise ConfigError("run dir is in use by another trainer (refused by process 0)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc):
        if self.lease is not None:
            self.lease.release()
