#!/usr/bin/env python3
"""Runs `ualm train` as N local processes joined by jax.distributed: the multi-host code path
(process shares of each batch, cross-process collectives, Orbax's multi-process checkpoint
commit) on one CPU machine. Each process gets its own fake CPU devices.

    python launch/local.py --num-processes 2 --devices-per-process 2 \
        --config CONFIG.yaml --run-dir runs/local [key=value ...] [--dry-run]

Before anything starts, launch/preflight.py loads the config with the overrides (as `ualm train`
will) and checks the mesh against the processes' devices, train.batch_size against the
processes and the config's data paths; a problem is one line on stderr and exit status 2.

Output lines are prefixed with `[pI]`. If one process fails the others are stopped, so a
crash never leaves the rest waiting in a collective. Exit status: 0 when all processes exit 0.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or via runpy
import preflight  # noqa: E402
from shellsafe import reject_control_chars  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROG = "launch/local.py"


def check(args) -> None:
    """launch/preflight.py's checks for these processes (all on this machine)."""
    name = f"{args.num_processes} processes x {args.devices_per_process} CPU devices"
    devices = args.num_processes * args.devices_per_process
    target = preflight.Target(name, f"{name} give {devices} devices", devices,
                              args.num_processes, Path.cwd(), unit="processes", shared_fs=True)
    preflight.check(target, args.config, list(args.overrides), args.run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(i: int, args) -> dict[str, str]:
    """What process i needs on top of the caller's environment."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={args.devices_per_process}")
    path = os.environ.get("PYTHONPATH")
    return {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags),
        "JAX_COORDINATOR_ADDRESS": f"localhost:{args.port}",
        "JAX_NUM_PROCESSES": str(args.num_processes),
        "JAX_PROCESS_ID": str(i),
        # This checkout's ualm_jax, whatever the caller's working directory.
        "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
    }


def train_argv(args) -> list[str]:
    stop = ["--stop-after", str(args.stop_after)] if args.stop_after else []
    return [sys.executable, "-m", "ualm_jax.cli", "train", "--config", args.config,
            "--run-dir", args.run_dir, *stop, *args.overrides]


def _pump(prefix: str, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def run(args) -> int:
    procs, pumps = [], []
    for i in range(args.num_processes):
        env = {**os.environ, **process_env(i, args)}
        p = subprocess.Popen(train_argv(args), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        t = threading.Thread(target=_pump, args=(f"[p{i}] ", p.stdout, sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    failed = None
    while any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if failed is not None:
            break
        time.sleep(0.2)
    if failed is not None:  # the others would wait for the dead one until a timeout
        time.sleep(args.grace_s)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    for t in pumps:
        t.join(timeout=5)
    codes = [p.wait() for p in procs]
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if not bad:
        return 0
    print("local launch: " + ", ".join(f"process {i} exited {c}" for i, c in bad), file=sys.stderr)
    first = codes[failed] if failed is not None else bad[0][1]  # the cause, not the stopped
    return first if first > 0 else 128 - first  # killed by signal N -> 128 + N, as a shell


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=2, help="fake CPU devices each")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("--grace-s", type=float, default=5.0,
                   help="after one process fails, wait this long before stopping the others")
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="passed to `ualm train`: at most this many steps, then save and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num-processes and --devices-per-process must be >= 1")
    reject_control_chars(args)
    with preflight.refusals(PROG):
        check(args)
    args.port = args.port or free_port()
    if args.dry_run:
        for i in range(args.num_processes):
            env = [f"{k}={v}" for k, v in process_env(i, args).items()]
            print(shlex.join(["env", *env, *train_argv(args)]))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
