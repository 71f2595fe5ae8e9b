#!/usr/bin/env python3
"""Cloud TPU VM launcher: create (or reuse) a slice, install this repo on every worker, run
`ualm train` on all workers at once.

    python launch/tpu_vm.py --name ualm-v5p --zone us-east5-a [--accelerator-type v5p-128] \
        [--spot] [--num-slices 2] [--reuse] [--skip-install] [--git-url URL [--git-ref REF]] \
        --config configs/ualm_gen_1.5b.yaml --run-dir gs://BUCKET/runs/gen [key=value ...] \
        [--dry-run]

Before anything is printed or run, launch/preflight.py checks the launch: the config as
`ualm train` will load it (file + overrides: a typo'd key, a missing file), the mesh against the
slice's devices, train.batch_size against its hosts, the run dir (a multi-host slice needs a
gs:// URL) and the config's data paths (they must exist, and reach the workers: on gs:// or
tracked by git). A problem is one line on stderr and exit status 2.

Steps (each a gcloud command; `--dry-run` prints them, one per line, shell-quoted, and runs
nothing; lines starting with `#` are notes, or waits the launcher does itself):
1. create: `gcloud compute tpus tpu-vm create` (one slice), or for `--num-slices N > 1` a queued
   resource `gcloud compute tpus queued-resources create --node-count N` whose slices are the
   TPU VMs NAME-0 .. NAME-(N-1). Without --dry-run an existing slice / queued resource of that
   name is reused; `--reuse` skips the step altogether.
2. install on every worker (`--worker=all`): the files git tracks in the working tree
   (uncommitted edits included; plus the --config file and its `base:` files if untracked) as a
   tarball (packed into a private temporary directory, removed after the copy), or a
   `git clone`; untracked data folders are never copied: data lives on a bucket (gs://) or is
   baked in (tracked). Then a Python venv (uv fetches Python 3.11+; TPU images ship an older
   one) and, as the Makefile installs, `uv pip install -r requirements.lock
   -r requirements-tpu.txt -f <libtpu releases>` (every version pinned; the lock's CPU torch
   wheel comes from the PyTorch CPU index) and `uv pip install --no-deps -e .`.
3. run on every worker of every slice: `UALM_DISTRIBUTED=1 ualm train ...`. `ualm train` calls
   `jax.distributed.initialize()`, which on a TPU VM reads its rank, the worker list and the
   coordinator (worker 0) from the metadata server.

Multislice: the queued resource puts the Megascale settings in each VM's `tpu-env` metadata,
where libtpu and jax read them: MEGASCALE_COORDINATOR_ADDRESS (worker 0 of slice 0),
MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, MEGASCALE_PORT. jax numbers processes slice by slice
(process = slice_id * hosts_per_slice + worker). The launcher adds `mesh.dcn.data=N` (data
parallel across slices over DCN; FSDP/TP stay inside a slice on ICI) unless the overrides
already set a `mesh.dcn.*` size.

The config path is relative to the repo root on the workers (the repo is copied there); a
`gs://` config is read there by `ualm train` itself. The run directory of a multi-host slice
must be shared by all workers: a `gs://` URL, which goes to every worker's command unchanged
(the workers reach the bucket with the TPU VMs' service account); a local path is refused. Data
paths in the config exist here and on the workers (`--skip-path-check` when they exist only
there, e.g. on a disk mounted on the workers).

Every value put into a remote shell line is shell-quoted (`--remote-dir` keeps a leading `~/`
and `$VAR` expansion); values with control characters (newline, CR, ...) are refused. The
tarball of the working tree is staged in a private directory (mkdtemp, mode 0700) that is
removed once it has been copied to the workers.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or via runpy
import preflight  # noqa: E402
from shellsafe import reject_control_chars, shell_path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROG = "launch/tpu_vm.py"
TARBALL = "ualm-jax.tar.gz"
FILE_LIST = "files"  # in the staging directory: what the tarball holds, NUL-separated
# What a dry run prints for the staging directory, which only a real run creates.
DRY_RUN_STAGE = os.path.join(tempfile.gettempdir(), "ualm-jax-XXXXXXXX")
LIBTPU_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
UV_VERSION = "0.13.8"  # as the Makefile
# TPU VM runtime image per accelerator family (`--version` overrides).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
EPILOG = ("Only the files git tracks (and the --config file) are copied to the workers: data "
          "must be on a bucket (gs://; built mixtures with data.stage_dir) or baked in (tracked "
          "by git). The config, mesh, batch size, run dir and data paths are checked before any "
          "gcloud command (one line and exit status 2 on a problem).")


def default_runtime(accelerator: str) -> str:
    family = accelerator.rsplit("-", 1)[0]
    if family not in RUNTIMES:
        raise preflight.PreflightError(f"no default runtime for {accelerator}; pass --version")
    return RUNTIMES[family]


def node_names(args) -> list[str]:
    if args.num_slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(args.num_slices)]


def gcloud_tail(args) -> list[str]:
    """Flags every `gcloud compute tpus` call takes."""
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def create_cmd(args) -> list[str]:
    common = [f"--accelerator-type={args.accelerator_type}"] + (["--spot"] if args.spot else [])
    if args.num_slices == 1:
        return ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *gcloud_tail(args),
                *common, f"--version={args.version}"]
    return ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
            *gcloud_tail(args), *common, f"--runtime-version={args.version}",
            f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]


def exists_cmd(args) -> list[str]:
    kind = ["tpu-vm"] if args.num_slices == 1 else ["queued-resources"]
    return ["gcloud", "compute", "tpus", *kind, "describe", args.name, *gcloud_tail(args),
            "--format=value(name)"]


def ssh_cmd(args, node: str, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *gcloud_tail(args),
            "--worker=all", f"--command={command}"]


@contextmanager
def staging_dir():
    """A fresh private directory (mode 0700, unpredictable name) for the tarball; removed with
    everything in it on exit. A file planted under a guessable /tmp name cannot redirect it."""
    d = tempfile.mkdtemp(prefix="ualm-jax-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def tarball(stage: str) -> str:
    return os.path.join(stage, TARBALL)


def needs_tarball(args) -> bool:
    return not args.skip_install and not args.git_url


def pack_cmd(args, stage: str = DRY_RUN_STAGE) -> list[str]:
    """The files of the list `write_file_list` puts in the stage (as the working tree has them)."""
    return ["tar", "-czf", tarball(stage), "-C", str(REPO), "--null", "-T",
            os.path.join(stage, FILE_LIST)]


def write_file_list(stage: str, files: list[str]) -> None:
    # `./` first: a name starting with `-` is never read as a tar option.
    data = b"".join(f"./{f}".encode("utf-8", "surrogateescape") + b"\0" for f in files)
    Path(stage, FILE_LIST).write_bytes(data)


def shipped_files(repo: Path, configs: list[Path], tracked=None) -> tuple[list[str], list[str]]:
    """(every file the tarball holds, the untracked config files among them), relative to
    `repo`: the files git tracks (`tracked`, else asks git) plus the config files, which may be
    new."""
    known = set(preflight.tracked_files(repo) if tracked is None else tracked)
    extra = sorted({str(c.relative_to(repo)) for c in configs} - known)
    return sorted(known | set(extra)), extra


def install_script(args) -> str:
    d = shell_path(args.remote_dir, tilde=True)
    if args.git_url:
        fetch = (f"(test -d {d}/.git || git clone -q -- {shlex.quote(args.git_url)} {d}) && "
                 f"git -C {d} fetch -q origin && git -C {d} checkout -q {shlex.quote(args.git_ref)}")
    else:
        fetch = f"mkdir -p -- {d} && tar -xzf ~/{TARBALL} -C {d}"
    # As the Makefile: uv installs the pinned lock, then the project without its deps. uv
    # takes the first index that has a package by default; the lock's pins need pip's rule (the
    # best match over PyPI and the PyTorch CPU index, which also serves some of PyPI's names).
    uv = "python3 -m uv pip install -q --python .venv/bin/python --compile-bytecode"
    return " && ".join([
        "set -e", fetch, f"cd -- {d}",
        f"python3 -m pip install -q --user uv=={UV_VERSION}",
        f"python3 -m uv venv -q --seed --allow-existing --python {shlex.quote(args.python)} .venv",
        f"{uv} -r requirements.lock -r requirements-tpu.txt -f {LIBTPU_LINKS} "
        f"--extra-index-url {TORCH_CPU_INDEX} --index-strategy unsafe-best-match",
        f"{uv} --no-deps -e .",
    ])


def train_overrides(args) -> list[str]:
    over = list(args.overrides)
    if args.num_slices > 1 and not any(o.startswith("mesh.dcn.") for o in over):
        over.append(f"mesh.dcn.data={args.num_slices}")
    return over


def config_on_worker(path: str) -> str:
    """A config inside this repo -> its path relative to the repo root (where it is copied)."""
    p = Path(path)
    if "://" in path or not p.exists():
        return path
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        raise preflight.PreflightError(f"--config {path} is outside the repo, so the workers "
                                       "will not have it; put it under configs/") from None


def check(args) -> None:
    """launch/preflight.py's checks for this slice and how the workers get the repo; sets
    args.ship / args.ship_untracked (the tarball's files) when the tarball is used."""
    config = config_on_worker(args.config)
    reaches, tracked = preflight.everywhere, set()
    if not args.skip_install:  # --skip-install: the workers hold what the user put there
        tracked = set(preflight.tracked_files(REPO))
        how = (f"a clone of {args.git_url}" if args.git_url
               else "the files git tracks (and the config)")
        reaches = lambda p: preflight.shipped_reason(p, tracked, how)  # noqa: E731
    target = preflight.tpu_target(args.accelerator_type, args.num_slices, REPO, reaches=reaches,
                                  check_paths=not args.skip_path_check)
    preflight.check(target, config, train_overrides(args), args.run_dir)
    args.ship, args.ship_untracked = [], []
    if args.skip_install:
        return
    configs = preflight.config_files(config, REPO)
    for c in configs:
        if REPO not in c.parents:
            raise preflight.PreflightError(f"--config {args.config}: {c} (a `base:` file) is "
                                           "outside the repo, so the workers will not have it")
    ship, untracked = shipped_files(REPO, configs, tracked)
    if args.git_url and untracked:
        raise preflight.PreflightError(f"--config {args.config}: {', '.join(untracked)} is not "
                                       "tracked by git, so the clone on the workers lacks it; "
                                       "commit and push it (or leave out --git-url)")
    if not args.git_url:
        args.ship, args.ship_untracked = ship, untracked


def run_script(args) -> str:
    train = shlex.join([".venv/bin/ualm", "train", "--config", config_on_worker(args.config),
                        "--run-dir", args.run_dir, *train_overrides(args)])
    if args.detach:  # survives the ssh session; the log stays on each worker
        train = f"setsid nohup {train} > ~/ualm-train.log 2>&1 < /dev/null &"
    return f"cd -- {shell_path(args.remote_dir, tilde=True)} && UALM_DISTRIBUTED=1 {train}"


def plan(args, stage: str = DRY_RUN_STAGE) -> list[tuple[str, list[str] | str]]:
    """(kind, what) in order. kind: cmd (run, stop on failure), create (skipped when the name
    exists), wait (a poll done here, `what` says for what), start (run concurrently, awaited).
    `stage`: the directory the tarball is packed into."""
    steps: list[tuple[str, list[str] | str]] = []
    if not args.reuse:
        steps.append(("create", create_cmd(args)))
        if args.num_slices > 1:
            steps.append(("wait", f"# wait until queued resource {args.name} is ACTIVE"))
    if not args.skip_install:
        if not args.git_url:
            new = args.ship_untracked
            extra = f" and {', '.join(new)} (untracked)" if new else ""
            steps.append(("note", f"# the tarball: the {len(args.ship) - len(new)} files git "
                                  f"tracks{extra}"))
            steps.append(("cmd", pack_cmd(args, stage)))
        for node in node_names(args):
            if not args.git_url:
                steps.append(("cmd", ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball(stage),
                                      f"{node}:{TARBALL}", *gcloud_tail(args), "--worker=all"]))
            steps.append(("cmd", ssh_cmd(args, node, install_script(args))))
    steps += [("start", ssh_cmd(args, node, run_script(args))) for node in node_names(args)]
    return steps


def wait_active(args, timeout_s: int = 6 * 3600) -> None:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name,
           *gcloud_tail(args), "--format=value(state.state)"]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        print(f"queued resource {args.name}: {state or '?'}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise SystemExit(f"queued resource {args.name} is {state}")
        time.sleep(30)
    raise SystemExit(f"queued resource {args.name} not ACTIVE after {timeout_s} s")


def execute(args, steps) -> int:
    return start_all(run_steps(args, steps))


def run_steps(args, steps) -> list[list[str]]:
    """Runs every step but the starts, in order; returns the start commands."""
    starts = []
    for kind, what in steps:
        if kind == "wait":
            wait_active(args)
        elif kind == "note":
            print(what, flush=True)
        elif kind == "start":
            starts.append(what)
        elif kind == "create" and subprocess.run(exists_cmd(args), capture_output=True).returncode == 0:
            print(f"reusing existing {args.name}", flush=True)
        else:
            print("+ " + shlex.join(what), flush=True)
            subprocess.run(what, check=True)
    return starts


def start_all(starts) -> int:
    # Every slice runs at once (a multislice job waits for all slices to join).
    procs = [subprocess.Popen(cmd) for cmd in starts]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None, help="default: gcloud's configured project")
    p.add_argument("--accelerator-type", default="v5p-128")
    p.add_argument("--version", default=None, help="TPU runtime (default: per accelerator family)")
    p.add_argument("--spot", action="store_true", help="spot capacity (may be preempted)")
    p.add_argument("--num-slices", type=int, default=1, help="> 1: multislice via queued resources")
    p.add_argument("--reuse", action="store_true", help="never create; the slice must exist")
    p.add_argument("--skip-install", action="store_true", help="workers already have the repo")
    p.add_argument("--git-url", default=None, help="clone this on the workers instead of copying")
    p.add_argument("--git-ref", default="main")
    p.add_argument("--remote-dir", default="ualm-jax",
                   help="repo directory under the worker's home (a leading ~/ and $NAME expand)")
    p.add_argument("--python", default="3.11", help="Python version of the workers' venv")
    p.add_argument("--detach", action="store_true",
                   help="start training in the background (log: ~/ualm-train.log on each worker)")
    p.add_argument("--config", required=True,
                   help="config in the repo (its path from here or from the repo root), or gs://")
    p.add_argument("--run-dir", required=True, help="shared run directory, e.g. gs://bucket/run")
    p.add_argument("--skip-path-check", action="store_true",
                   help="do not look for the config's data paths here (they exist only on the "
                        "workers, e.g. a disk mounted there)")
    p.add_argument("--dry-run", action="store_true",
                   help="check, print the commands, run nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.num_slices < 1:
        p.error("--num-slices must be >= 1")
    reject_control_chars(args)
    if args.git_ref.startswith("-"):
        raise SystemExit(f"--git-ref {args.git_ref!r}: a ref cannot start with '-'")
    with preflight.refusals(PROG):
        preflight.tpu_slice(args.accelerator_type)
        args.version = args.version or default_runtime(args.accelerator_type)
        check(args)
    if args.dry_run:
        for _, what in plan(args):
            print(what if isinstance(what, str) else shlex.join(what))
        return 0
    if not needs_tarball(args):
        return execute(args, plan(args))
    with staging_dir() as stage:  # removed once the tarball is on the workers
        write_file_list(stage, args.ship)
        starts = run_steps(args, plan(args, stage))
    return start_all(starts)


if __name__ == "__main__":
    sys.exit(main())
