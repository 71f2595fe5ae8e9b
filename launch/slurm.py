#!/usr/bin/env python3
"""`ualm train` on a SLURM GPU cluster: render launch/slurm.sbatch.tmpl and `sbatch` it.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 [--per node|gpu] \
        [--partition P] [--account A] [--time 24:00:00] [--ualm .venv/bin/ualm] \
        --config configs/ualm_gen_1.5b.yaml --run-dir /shared/runs/gen [key=value ...] \
        [--out FILE] [--dry-run]

`--per gpu` (default): one task per GPU, each task sees its node's GPUs and keeps one
(JAX_LOCAL_DEVICE_IDS=SLURM_LOCALID). `--per node`: one task per node drives all its GPUs.
Either way JAX_COORDINATOR_ADDRESS is the first host of `scontrol show hostnames`,
JAX_NUM_PROCESSES = SLURM_NTASKS and JAX_PROCESS_ID = SLURM_PROCID; `ualm train` passes them to
jax.distributed.initialize. The job runs in the submit directory (or --workdir), which must be
this repo on a file system every node sees, as must the run directory.

Before anything is printed or run, launch/preflight.py loads the config as the job will (from
--workdir, with the overrides) and checks the mesh against the nodes' GPUs, train.batch_size
against the tasks and the config's data paths (from --workdir, which, like the run directory,
every node sees, so this machine sees them too; `--skip-path-check` skips that). A problem is
one line on stderr and exit status 2.

`--dry-run` prints the script between `# file: PATH` and `# end of file`, then the command.

Values reach the script as data: the training command is shell-quoted, `--workdir` expands
`$NAME` / `${NAME}` (as its default `$SLURM_SUBMIT_DIR`) and nothing else (no `$(...)`,
backquotes or globs), and values with control characters (newline, CR, ...) are refused, so none
adds a line to the script. `--setup` lines are shell code by design and go in as given.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or via runpy
import preflight  # noqa: E402
from shellsafe import expand_vars, reject_control_chars, shell_path  # noqa: E402
from templating import render  # noqa: E402

TEMPLATE = Path(__file__).resolve().parent / "slurm.sbatch.tmpl"
PROG = "launch/slurm.py"


def workdir_here(args) -> Path:
    """--workdir as the job's shell expands it: SLURM_SUBMIT_DIR is here (sbatch runs here)."""
    env = {"SLURM_SUBMIT_DIR": os.getcwd(), **os.environ}
    path = expand_vars(args.workdir, env)
    if not os.path.isdir(path):  # an unset variable stays `$NAME`: no such directory
        raise preflight.PreflightError(
            f"--workdir {args.workdir}: {path} is not a directory here; the job runs in it and "
            "reads --config and relative data paths from it (launch from a machine that mounts "
            "the cluster's shared file system)")
    return Path(path).resolve()


def check(args) -> None:
    """launch/preflight.py's checks for this allocation (every node sees --workdir)."""
    per_gpu = args.per == "gpu"
    nodes = f"{args.nodes} node{'s' if args.nodes > 1 else ''}"
    name = f"{nodes} x {args.gpus_per_node} GPU{'s' if args.gpus_per_node > 1 else ''}"
    devices = args.nodes * args.gpus_per_node
    target = preflight.Target(
        name, f"{name} give {devices} devices", devices,
        devices if per_gpu else args.nodes, workdir_here(args),
        unit="processes (one per GPU)" if per_gpu else "processes (one per node)",
        shared_fs=True, check_paths=not args.skip_path_check)
    preflight.check(target, args.config, list(args.overrides), args.run_dir)


def script(args) -> str:
    per_gpu = args.per == "gpu"
    extra = [f"#SBATCH --partition={args.partition}"] if args.partition else []
    extra += [f"#SBATCH --account={args.account}"] if args.account else []
    extra += [f"#SBATCH {s}" for s in args.sbatch]
    setup = [f"cd -- {shell_path(args.workdir)}"] + list(args.setup)
    train = shlex.join([args.ualm, "train", "--config", args.config, "--run-dir", args.run_dir,
                        *args.overrides])
    values = {
        "job_name": args.job_name, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
        "tasks_per_node": args.gpus_per_node if per_gpu else 1,
        "cpus_per_task": args.cpus_per_gpu * (1 if per_gpu else args.gpus_per_node),
        "time": args.time, "log_dir": args.log_dir, "port": args.port,
        "extra_sbatch": "\n".join(extra), "setup": "\n".join(setup),
        "local_devices": "export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" if per_gpu else "",
        "train_cmd": train,
    }
    return render(TEMPLATE.read_text(), values)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--per", choices=["gpu", "node"], default="gpu", help="one task per GPU or node")
    p.add_argument("--cpus-per-gpu", type=int, default=8)
    p.add_argument("--job-name", default="ualm-train")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before training, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--workdir", default="$SLURM_SUBMIT_DIR",
                   help="the repo on a shared file system ($NAME / ${NAME} are expanded)")
    p.add_argument("--log-dir", default="logs", help="where SLURM writes the job's output")
    p.add_argument("--port", type=int, default=8476, help="jax coordinator port on the first node")
    p.add_argument("--ualm", default=".venv/bin/ualm", help="the ualm executable (from --workdir)")
    p.add_argument("--out", default=None, help="script path (default: JOB_NAME.sbatch)")
    p.add_argument("--config", required=True, help="config path from --workdir, or gs://")
    p.add_argument("--run-dir", required=True, help="on a file system every node sees, or gs://")
    p.add_argument("--skip-path-check", action="store_true",
                   help="do not look for the config's data paths here")
    p.add_argument("--dry-run", action="store_true",
                   help="check, print script and command, run nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")
    reject_control_chars(args)
    with preflight.refusals(PROG):
        check(args)
    out = args.out or f"{args.job_name}.sbatch"
    text = script(args)
    cmd = ["sbatch", out]
    if args.dry_run:
        print(f"# file: {out}\n{text}# end of file\n{shlex.join(cmd)}")
        return 0
    Path(out).write_text(text)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)  # SLURM does not create it
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
