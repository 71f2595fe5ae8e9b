"""Checks a launch before any cloud or cluster command is printed or run (shared by the launchers).

The config is loaded exactly as `ualm train` will load it on the workers (config file + the same
overrides, in the directory the job runs in, via ualm_jax.config.load_config); then the mesh is
checked against the devices the job gets, train.batch_size against its processes, the run dir
against whether the hosts share a file system, and the config's data paths against this machine
and what reaches the workers. The first problem is one line on stderr,
`launch/NAME.py: error: ...`, naming the flag, file or config key, and exit status 2.

Importing this module is cheap (stdlib only); the config code is imported when a check runs.
"""
from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

REPO = Path(__file__).resolve().parent.parent


class PreflightError(Exception):
    """One line: what is wrong, naming the flag, file or config key, and what was expected."""


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextmanager
def refusals(prog: str) -> Iterator[None]:
    """A PreflightError inside becomes `prog: error: ...` on stderr and exit status 2."""
    try:
        yield
    except PreflightError as e:
        fail(prog, str(e))


# --------------------------------------------------------------------------------------------
# What the job runs on
# --------------------------------------------------------------------------------------------


def tpu_slice(accelerator: str) -> dict:
    """`v5p-128` -> chips, hosts, chips per host and chip grid of one slice (the one table of
    TPU slices: ualm_jax/topology.py)."""
    _config_module()
    from ualm_jax.config import ConfigError
    from ualm_jax.topology import parse_topology

    if not re.fullmatch(r"[a-z0-9]+-\d+", accelerator.strip().lower()):
        raise PreflightError(f"--accelerator-type {accelerator}: expected a Cloud TPU name such "
                             "as v5p-128, v5litepod-16 or v6e-32")
    try:
        t = parse_topology(accelerator)
    except ConfigError as e:
        raise PreflightError(str(e).replace("--topology", "--accelerator-type")) from None
    return {"chips": t.chips, "hosts": t.hosts, "chips_per_host": t.chips_per_host,
            "grid": t.grid, "generation": t.generation}


def everywhere(path: str) -> Optional[str]:
    """Every path reaches the workers (they see this machine's files, or the user put them
    there)."""
    return None


@dataclass
class Target:
    """What a launch gives `ualm train`: devices, processes, and where it runs."""

    name: str                # "v5p-8", "2 slices of v5p-128", "2 nodes x 8 GPUs", ...
    has: str                 # "v5p-8 has 4 chips (4 devices)"
    devices: int             # JAX devices in all
    processes: int           # JAX processes in all (one per TPU host)
    workdir: Path            # where the config and relative data paths are found from, here
    unit: str = "hosts"      # what `processes` counts, for messages
    shared_fs: bool = False  # every process sees this machine's file system (a local run dir works)
    run_dir_hint: str = "use a gs:// URL every host can reach"
    mounts: tuple = ()       # absolute paths of volumes only the workers have: not checked here
    # Why a local data path (as the config names it) does not reach the workers; None: it does.
    reaches: Callable[[str], Optional[str]] = field(default=everywhere)
    check_paths: bool = True
    # The job's path -> this machine's (e.g. the image's /app -> the repo); default: as is.
    localize: Optional[Callable[[str], str]] = None


def tpu_target(accelerator: str, num_slices: int, workdir: Path, **kw) -> Target:
    s = tpu_slice(accelerator)
    chips, hosts = s["chips"] * num_slices, s["hosts"] * num_slices
    name = accelerator if num_slices == 1 else f"{num_slices} slices of {accelerator}"
    verb = "has" if num_slices == 1 else "have"
    has = f"{name} {verb} {chips} chips ({chips} devices)"
    return Target(name, has, chips, hosts, workdir, **kw)


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def check(target: Target, config: str, overrides: list[str], run_dir: str):
    """Every check, in order; the first problem raises PreflightError. Returns the Config."""
    cfg = load(config, overrides, target)
    check_run_dir(target, run_dir)
    check_mesh(target, cfg.mesh)
    check_batch(target, cfg.train.batch_size)
    if target.check_paths:
        check_data_paths(target, cfg)
    return cfg


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _config_module():
    if str(REPO) not in sys.path:  # this checkout's ualm_jax, whatever the caller's directory
        sys.path.insert(0, str(REPO))
    try:
        import ualm_jax.config as config
        import ualm_jax.storage as storage
    except ImportError as e:
        raise PreflightError(f"checking the config needs this repo's Python packages ({e}): run "
                             "the launcher with the project's venv, e.g. .venv/bin/python "
                             "launch/... (`make venv` creates it)") from None
    return config, storage


def load(config: str, overrides: list[str], target: Target):
    """The config as `ualm train --config CONFIG OVERRIDES` loads it in the job's directory.
    A failure names the override that causes it, else the config file."""
    cfg_mod, storage = _config_module()

    def attempt(over):
        with _cwd(target.workdir):
            return cfg_mod.load_config(config, over)

    remote = storage.is_url(config)
    with _cwd(target.workdir):
        found = remote or Path(cfg_mod.config_path(config)).is_file()
    if not found:
        raise PreflightError(f"--config {config}: no such file (looked in {target.workdir} and "
                             "among the configs shipped in configs/)")
    try:
        return attempt(overrides)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        err = str(e)
    except Exception as e:  # a gs:// config: the client's own errors (credentials, network)
        if not remote:
            raise
        err = f"cannot read it here ({type(e).__name__}: {e}); check your credentials"
    err = " ".join(err.split())  # one line
    for i, item in enumerate(overrides):  # the override without which the config loads
        try:
            attempt(overrides[:i] + overrides[i + 1:])
        except Exception:
            continue
        raise PreflightError(err if item in err else f"override {item}: {err}")
    raise PreflightError(err if str(config) in err else f"--config {config}: {err}")


def check_mesh(target: Target, mesh) -> None:
    """The mesh rule of `ualm train` (MeshConfig.axis_sizes): mesh.ici x mesh.dcn sizes multiply
    to the job's device count; at most one is -1, which takes what the others leave."""
    from ualm_jax.config import ConfigError

    try:
        mesh.axis_sizes(target.devices, target.has)
    except ConfigError as e:
        raise PreflightError(str(e)) from None


def check_batch(target: Target, batch_size: int) -> None:
    """Each process packs (or slices) its own equal share of every global batch's rows
    (data_pipelines grain_pipeline / seqio_pipeline, ualm_jax/train/data.py process_rows)."""
    if batch_size % target.processes:
        raise PreflightError(f"train.batch_size={batch_size} must be divisible by the "
                             f"{target.processes} {target.unit} of {target.name} (each feeds an "
                             "equal share of every batch's rows)")


def _under(path: str, mounts) -> bool:
    if not path.startswith("/"):
        return False
    p = posixpath.normpath(path)
    return any(posixpath.commonpath([p, m]) == m for m in mounts)


def check_run_dir(target: Target, run_dir: str) -> None:
    _, storage = _config_module()
    if (target.processes == 1 or target.shared_fs or storage.is_url(run_dir)
            or _under(run_dir, target.mounts)):
        return
    raise PreflightError(f"--run-dir {run_dir}: the {target.processes} {target.unit} of "
                         f"{target.name} share no file system, so each would write its own "
                         f"run; {target.run_dir_hint}")


def data_paths(cfg) -> list[tuple[str, str]]:
    """(dotted key, path) of every file or folder the run reads that the config names."""
    from ualm_jax.config import parse_mixture

    d, out = cfg.data, []
    if d.source == "mixture" or (d.source == "seqio" and d.mixture):
        out += [(f"data.mixture[{i}].path", e.path) for i, e in enumerate(parse_mixture(d.mixture))]
    if d.source == "preference":
        out.append(("data.preference_path", d.preference_path))
    out += [("data.tokenizer", d.tokenizer), ("data.codec", d.codec),
            ("train.init_from", cfg.train.init_from), ("eval.prompts", cfg.eval.prompts),
            ("eval.clap", cfg.eval.clap)]
    if cfg.eval.fd_model != "mel-stats":  # a built-in statistic, not a path
        out.append(("eval.fd_model", cfg.eval.fd_model))
    return [(k, p) for k, p in out if p]


def check_data_paths(target: Target, cfg) -> None:
    _, storage = _config_module()
    for key, path in data_paths(cfg):
        if storage.is_url(path) or _under(path, target.mounts):
            continue
        here = target.localize(path) if target.localize else path
        local = Path(here) if os.path.isabs(here) else target.workdir / here
        if not local.exists():
            raise PreflightError(f"{key}={path}: not found ({local} does not exist); data the "
                                 "job reads must exist, on gs:// or where the workers see it")
        why = target.reaches(path)
        if why:
            raise PreflightError(f"{key}={path}: {why}")


# --------------------------------------------------------------------------------------------
# What git tracks (what the TPU VM launcher ships)
# --------------------------------------------------------------------------------------------


def tracked_files(repo: Path) -> list[str]:
    """Paths git tracks under `repo` that exist in the working tree (uncommitted edits
    included), relative to it."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise PreflightError(f"{repo} is not a git checkout (git ls-files failed), so the files "
                             "to ship are unknown: use --git-url or --skip-install") from None
    names = [n for n in out.decode("utf-8", "surrogateescape").split("\0") if n]
    return [n for n in names if os.path.lexists(repo / n)]


def shipped_reason(path: str, shipped: set, what: str) -> Optional[str]:
    """Whether `path` (relative to the repo, a file or a folder) is among `shipped`; the reason
    if not. `what` says how the workers get the repo."""
    p = posixpath.normpath(path)
    if os.path.isabs(path) or p == ".." or p.startswith("../"):
        return (f"is a path on this machine, and the workers get only {what}, at --remote-dir: "
                "put the data on gs:// (or in the repo, tracked by git, named relative to it)")
    if p in shipped or any(s.startswith(p + "/") for s in shipped) or p == ".":
        return None
    return (f"is not tracked by git, and the workers get only {what}: put the data on gs:// "
            "(data.stage_dir copies built data to local disk) or bake it in (git add)")


def config_files(config: str, workdir: Path) -> list[Path]:
    """The config file and the `base:` files it brings in (paths relative to each file), as
    found from `workdir`; none for a gs:// config (the workers read it there)."""
    cfg_mod, storage = _config_module()
    if storage.is_url(config):
        return []
    import yaml

    out: list[Path] = []

    def walk(path: Path) -> None:
        path = path if path.is_absolute() else workdir / path
        if path.resolve() in out or not path.is_file():
            return
        out.append(path.resolve())
        raw = yaml.safe_load(path.read_text()) or {}
        bases = raw.get("base") if isinstance(raw, dict) else None
        for b in [bases] if isinstance(bases, str) else bases or []:
            walk(path.parent / b)

    with _cwd(workdir):
        walk(Path(cfg_mod.config_path(config)))
    return out
