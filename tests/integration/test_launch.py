"""Launchers: every `--dry-run` prints the commands it would run (launch/preflight.py's checks of
a bad launch: test_launch_preflight.py); the SLURM script's env wiring
runs against stand-in `scontrol`/`srun`; multi-host start-up decisions; and a real two-process
`ualm train` on CPU (jax.distributed over localhost, gloo collectives) that checkpoints, resumes,
and trains on exactly the configured global batches."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from paths import REPO, fake_subprocess  # noqa: E402


LAUNCH = REPO / "launch"
# Every launch is checked first (launch/preflight.py): configs/demo.yaml with these overrides fits
# every slice below (synthetic data, a mesh that fills the devices, a batch every host count
# here divides).
FIT = ["data.source=synthetic", "mesh.ici.data=1", "mesh.ici.fsdp=-1", "mesh.ici.tensor=1",
       "train.batch_size=192"]
CONFIG = "configs/demo.yaml"
ABS_CONFIG = str(REPO / CONFIG)  # for launches that run from another directory
HOSTILE_KEY = "data.seqio.mixture"  # a string the synthetic runs never read: any value loads


def dry(script: str, *args: str, env=None) -> str:
    out = subprocess.run([sys.executable, str(LAUNCH / script), "--dry-run", *args],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def file_and_commands(text: str):
    """`# file: PATH` / contents / `# end of file` / commands -> (path, contents, [argv])."""
    head, _, tail = text.partition("# end of file\n")
    first, _, body = head.partition("\n")
    assert first.startswith("# file: ")
    return first[len("# file: "):], body, [shlex.split(x) for x in tail.splitlines() if x]


def remote_command(argv: list[str]) -> str:
    return next(a[len("--command="):] for a in argv if a.startswith("--command="))


def train_argv(shell: str) -> list[str]:
    """`cd X && ENV=1 .venv/bin/ualm train ...` -> its last command as argv (`ENV=1` first)."""
    return shlex.split(shell.split("&&")[-1])


# --------------------------------------------------------------------------------------------
# Dry runs
# --------------------------------------------------------------------------------------------


def test_dry_runs_import_nothing_heavy():
    code = ("import runpy, sys\n"
            "for argv in {argvs!r}:\n"
            "    sys.argv = argv\n"
            "    try:\n"
            "        runpy.run_path(argv[0], run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert not e.code, (argv, e.code)\n"
            # The config check imports ualm_jax.config (and yaml), never jax.
            "heavy = [m for m in ('jax', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    common = ["--config", CONFIG, "--run-dir", "gs://b/r", "--dry-run"]
    argvs = [[str(LAUNCH / "tpu_vm.py"), "--name", "n", "--zone", "z", *common, *FIT],
             [str(LAUNCH / "xpk.py"), "--name", "n", "--image", "i", *common, *FIT],
             [str(LAUNCH / "slurm.py"), *common, *FIT],
             [str(LAUNCH / "local.py"), "--devices-per-process", "4", *common, *FIT]]
    out = subprocess.run([sys.executable, "-c", code.format(argvs=argvs)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_tpu_vm_single_slice():
    out = dry("tpu_vm.py", "--name", "ualm-a", "--zone", "us-east5-a", "--config",
              "configs/demo.yaml", "--run-dir", "gs://bkt/run", *FIT, "train.steps=10")
    cmds = [shlex.split(x) for x in out.splitlines() if not x.startswith("#")]
    create = cmds[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ualm-a"]
    for flag in ("--zone=us-east5-a", "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"):
        assert flag in create
    assert "--spot" not in create
    scp = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(scp) == 1 and len(ssh) == 2
    assert all("--worker=all" in c for c in scp + ssh)
    assert scp[0][6] == "ualm-a:ualm-jax.tar.gz" and all(c[5] == "ualm-a" for c in ssh)
    install = remote_command(ssh[0])
    assert "-r requirements.lock -r requirements-tpu.txt" in install
    assert "--no-deps -e ." in install
    assert "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html" in install
    run = remote_command(ssh[1])
    assert "UALM_DISTRIBUTED=1" in run
    assert train_argv(run)[1:] == [".venv/bin/ualm", "train", "--config", "configs/demo.yaml",
                                   "--run-dir", "gs://bkt/run", *FIT, "train.steps=10"]
    assert "mesh.dcn" not in out


def test_tpu_vm_multislice_queued_resources():
    out = dry("tpu_vm.py", "--name", "ms", "--zone", "us-east5-a", "--num-slices", "2", "--spot",
              "--accelerator-type", "v5p-256", "--config", "configs/demo.yaml",
              "--run-dir", "gs://bkt/run", *FIT)
    lines = out.splitlines()
    create = shlex.split(lines[0])
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ms"]
    for flag in ("--node-count=2", "--node-prefix=ms", "--spot", "--accelerator-type=v5p-256",
                 "--runtime-version=v2-alpha-tpuv5"):
        assert flag in create
    assert lines[1].startswith("# wait until queued resource ms is ACTIVE")
    runs = [shlex.split(x) for x in lines if "ualm train" in x]
    assert [r[5] for r in runs] == ["ms-0", "ms-1"]  # one ssh per slice, all its workers
    for r in runs:
        assert "--worker=all" in r
        assert train_argv(remote_command(r))[-1] == "mesh.dcn.data=2"
    # A mesh.dcn size given by the user wins.
    out = dry("tpu_vm.py", "--name", "ms", "--zone", "z", "--num-slices", "2", "--reuse",
              "--skip-install", "--config", CONFIG, "--run-dir", "gs://b/r", *FIT,
              "mesh.dcn.fsdp=2")
    assert "mesh.dcn.data" not in out and "create" not in out and out.count("mesh.dcn.fsdp=2") == 2


def test_xpk_jobset_manifest():
    path, body, cmds = file_and_commands(dry(
        "xpk.py", "--name", "ualm-js", "--image", "reg/ualm:1", "--num-slices", "2",
        "--config", "configs/demo.yaml", "--run-dir", "gs://bkt/run", *FIT, "train.steps=7"))
    assert cmds == [["kubectl", "apply", "-f", path]]
    js = yaml.safe_load(body)
    assert js["kind"] == "JobSet" and js["metadata"]["name"] == "ualm-js"
    (rj,) = js["spec"]["replicatedJobs"]
    assert rj["replicas"] == 2  # one job per slice
    job = rj["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # v5p-128: 64 chips, 4 per host
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4"}
    (c,) = pod["containers"]
    assert c["image"] == "reg/ualm:1" and c["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"] == \
        "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):8476"
    assert env["JAX_NUM_PROCESSES"] == "32"
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_SLICE_ID"] == "$(SLICE_ID)"
    (script,) = c["args"]
    assert "JAX_PROCESS_ID=$$((SLICE_ID * 16 + JOB_COMPLETION_INDEX))" in script
    assert shlex.split(script.split("exec ", 1)[1]) == [
        "ualm", "train", "--config", "configs/demo.yaml", "--run-dir", "gs://bkt/run",
        *FIT, "train.steps=7", "mesh.dcn.data=2"]
    # One slice: no Megascale variables, no DCN axis.
    _, body, _ = file_and_commands(dry("xpk.py", "--name", "one", "--image", "i",
                                       "--accelerator-type", "v5litepod-16", "--config", CONFIG,
                                       "--run-dir", "gs://b/r", *FIT))
    one = yaml.safe_load(body)["spec"]["replicatedJobs"][0]["template"]["spec"]
    (c,) = one["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if e["name"].startswith("MEGASCALE")]
    assert "mesh.dcn" not in c["args"][0]
    assert one["parallelism"] == 4
    assert one["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"


def test_xpk_workload_create_command():
    (cmd,) = [shlex.split(x) for x in dry(
        "xpk.py", "--submit", "xpk", "--cluster", "tpu-c", "--name", "w", "--image", "reg/u:1",
        "--num-slices", "2", "--config", "configs/demo.yaml", "--run-dir", "gs://b/r",
        *FIT).splitlines()]
    assert cmd[:3] == ["xpk", "workload", "create"]
    for flag in ("--cluster=tpu-c", "--workload=w", "--tpu-type=v5p-128", "--num-slices=2",
                 "--docker-image=reg/u:1"):
        assert flag in cmd
    assert shlex.split(remote_command(cmd)) == [
        "UALM_DISTRIBUTED=1", "ualm", "train", "--config", "configs/demo.yaml", "--run-dir",
        "gs://b/r", *FIT, "mesh.dcn.data=2"]


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_script_wiring(tmp_path, per):
    """The rendered script, run with stand-ins for scontrol and srun, gives every task the
    coordinator (first host), the process count and its own rank."""
    fake_ualm = tmp_path / "ualm"
    fake_ualm.write_text('#!/bin/bash\necho "task $JAX_PROCESS_ID/$JAX_NUM_PROCESSES '
                         '$JAX_COORDINATOR_ADDRESS local=${JAX_LOCAL_DEVICE_IDS:-all} args: $*"\n')
    (tmp_path / "scontrol").write_text('#!/bin/bash\necho gpu-node-7\necho gpu-node-8\n')
    (tmp_path / "srun").write_text(  # runs each task in turn with its SLURM ids
        '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
        'for ((i = 0; i < SLURM_NTASKS; i++)); do\n'
        '  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@"\ndone\n')
    for f in ("ualm", "scontrol", "srun"):
        (tmp_path / f).chmod(0o755)
    path, body, cmds = file_and_commands(dry(
        "slurm.py", "--nodes", "2", "--gpus-per-node", "2", "--per", per, "--partition", "a100",
        "--ualm", str(fake_ualm), "--out", str(tmp_path / "job.sbatch"),
        "--config", "configs/demo.yaml", "--run-dir", "/shared/run", *FIT, "train.steps=3"))
    assert cmds == [["sbatch", path]]
    tasks_per_node = 2 if per == "gpu" else 1
    for line in ("#SBATCH --nodes=2", f"#SBATCH --ntasks-per-node={tasks_per_node}",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --partition=a100",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST"', "JAX_NUM_PROCESSES=$SLURM_NTASKS",
                 "JAX_PROCESS_ID=$SLURM_PROCID"):
        assert line in body
    assert ("JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in body) == (per == "gpu")
    script = tmp_path / "job.sbatch"
    script.write_text(body)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_NTASKS": str(2 * tasks_per_node),
           "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_SUBMIT_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    tasks = [x for x in out.stdout.splitlines() if x.startswith("task ")]
    n = 2 * tasks_per_node
    args = f"args: train --config configs/demo.yaml --run-dir /shared/run {' '.join(FIT)} " \
           "train.steps=3"
    assert tasks == [f"task {i}/{n} gpu-node-7:8476 local="
                     f"{i % tasks_per_node if per == 'gpu' else 'all'} {args}" for i in range(n)]


def test_local_dry_run():
    out = dry("local.py", "--num-processes", "3", "--devices-per-process", "2", "--port", "4321",
              "--config", CONFIG, "--run-dir", "r", *FIT, "train.steps=2")
    cmds = [shlex.split(x) for x in out.splitlines()]
    assert len(cmds) == 3
    for i, c in enumerate(cmds):
        m = c.index("-m")  # env K=V ... PYTHON -m ualm_jax.cli train ...
        env = dict(a.split("=", 1) for a in c[1:m - 1])
        assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:4321"
        assert env["JAX_NUM_PROCESSES"] == "3" and env["JAX_PROCESS_ID"] == str(i)
        assert env["JAX_PLATFORMS"] == "cpu"
        assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
        assert c[m + 1:] == ["ualm_jax.cli", "train", "--config", CONFIG, "--run-dir", "r",
                             *FIT, "train.steps=2"]


# --------------------------------------------------------------------------------------------
# gs:// run dirs, the image, hostile input (dry runs and stand-ins; no network)
# --------------------------------------------------------------------------------------------


def refused(script: str, *args: str) -> str:
    """A dry run that must stop before printing anything; its one-line reason."""
    out = subprocess.run([sys.executable, str(LAUNCH / script), "--dry-run", *args],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode != 0 and not out.stdout, (out.returncode, out.stdout)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def manifest_pod(text: str) -> dict:
    _, body, _ = file_and_commands(text)
    return yaml.safe_load(body)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def argv_logger(path: Path, log: Path) -> Path:
    """An executable that appends its argv (and a few env values, its cwd) to `log` as JSON;
    as `python3 -m uv venv` it also creates .venv/bin/{python,ualm} (copies of itself)."""
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, shutil, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': [os.path.basename(sys.argv[0])] + sys.argv[1:],\n"
        "                        'cwd': os.getcwd(), 'pid': os.environ.get('JAX_PROCESS_ID'),\n"
        "                        'dist': os.environ.get('UALM_DISTRIBUTED')}) + '\\n')\n"
        "if sys.argv[1:4] == ['-m', 'uv', 'venv']:\n"
        "    os.makedirs('.venv/bin', exist_ok=True)\n"
        "    for name in ('python', 'ualm'):\n"
        "        shutil.copy(sys.argv[0], os.path.join('.venv/bin', name))\n")
    path.chmod(0o755)
    return path


def logged(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def planted(root: Path) -> list[Path]:
    """Files an injected `touch PWNED...` would have made."""
    return [p for p in root.rglob("*") if p.name.startswith("PWNED")]


def test_xpk_gs_run_dir_needs_no_volume():
    run = "gs://b/run"
    for extra in ([], ["--num-slices", "2"], ["--service-account", "trainer"]):
        text = dry("xpk.py", "--name", "g", "--image", "i", *extra, "--config", CONFIG,
                   "--run-dir", run, *FIT)
        pod = manifest_pod(text)
        (c,) = pod["containers"]
        assert "volumes" not in pod and "volumeMounts" not in c  # nothing mounted for it
        body = [x for x in text.splitlines() if not x.lstrip().startswith("#")]
        assert not [x for x in body if "volume" in x.lower() or "hostpath" in x.lower()]
        argv = shlex.split(c["args"][0].split("exec ", 1)[1])
        assert argv[argv.index("--run-dir") + 1] == run
    (cmd,) = [shlex.split(x) for x in dry(
        "xpk.py", "--submit", "xpk", "--cluster", "c", "--name", "g", "--image", "i",
        "--config", CONFIG, "--run-dir", run, *FIT).splitlines()]
    argv = shlex.split(remote_command(cmd))
    assert argv[argv.index("--run-dir") + 1] == run


def test_xpk_local_run_dir_needs_a_shared_volume():
    base = ["--name", "l", "--image", "i", "--config", CONFIG, "--run-dir", "/shared/run"]
    for extra in ([], ["--submit", "xpk", "--cluster", "c"], ["--pvc", "runs:/other"]):
        line = refused("xpk.py", *base, *extra, *FIT)
        assert "--run-dir /shared/run" in line and "16 hosts" in line and "gs://" in line
    assert "gs://" in refused("xpk.py", *base[:-1], "relative/run", "--pvc", "runs:/shared", *FIT)
    assert "--pvc" in refused("xpk.py", *base, "--pvc", "no-path")
    assert "--submit kubectl" in refused("xpk.py", *base, "--pvc", "runs:/shared",
                                         "--submit", "xpk", "--cluster", "c")
    # An explicit shared volume over it: mounted in every pod.
    pod = manifest_pod(dry("xpk.py", *base, "--pvc", "runs:/shared/", *FIT))
    (c,) = pod["containers"]
    assert c["volumeMounts"] == [{"name": "run-volume-0", "mountPath": "/shared"}]
    assert pod["volumes"] == [{"name": "run-volume-0",
                               "persistentVolumeClaim": {"claimName": "runs"}}]
    # One host in all: nothing to share with, a local path is fine.
    pod = manifest_pod(dry("xpk.py", "--name", "s", "--image", "i", "--accelerator-type",
                           "v5litepod-8", "--config", CONFIG, "--run-dir", "runs/x", *FIT))
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 8
    assert "volumes" not in pod


def test_xpk_service_account_leaves_the_host_network():
    pod = manifest_pod(dry("xpk.py", "--name", "n", "--image", "i", "--config", CONFIG,
                           "--run-dir", "gs://b/r", *FIT))
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "serviceAccountName" not in pod
    pod = manifest_pod(dry("xpk.py", "--name", "n", "--image", "i", "--service-account",
                           "ualm-trainer", "--config", CONFIG, "--run-dir", "gs://b/r", *FIT))
    assert pod["serviceAccountName"] == "ualm-trainer"
    assert pod["hostNetwork"] is False and "dnsPolicy" not in pod


def test_xpk_default_image_is_the_dockerfile_tag(launcher):
    xpk = launcher("xpk")
    text = (REPO / "Dockerfile").read_text()
    (built,) = re.findall(r"^#\s+docker build -t (\S+) \.$", text, re.M)
    (pushed,) = re.findall(r"^#\s+docker push (\S+)$", text, re.M)
    assert built == pushed == xpk.default_image("PROJECT") == "gcr.io/PROJECT/ualm-jax:latest"
    pod = manifest_pod(dry("xpk.py", "--name", "n", "--project", "PROJECT", "--config", CONFIG,
                           "--run-dir", "gs://b/r", *FIT))
    assert pod["containers"][0]["image"] == built
    (cmd,) = [shlex.split(x) for x in dry(
        "xpk.py", "--submit", "xpk", "--cluster", "c", "--project", "PROJECT", "--name", "n",
        "--config", CONFIG, "--run-dir", "gs://b/r", *FIT).splitlines()]
    assert f"--docker-image={built}" in cmd
    assert "--project" in refused("xpk.py", "--name", "n", "--config", "c.yaml",
                                  "--run-dir", "gs://b/r")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.strip()
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip() + " "
            continue
        op, _, rest = cur.partition(" ")
        out.append((op.upper(), rest.strip()))
        cur = ""
    return out


def test_dockerfile_builds_the_locked_project(launcher):
    """What can be checked without a Docker engine: the pins installed first, then the project
    with --no-deps, `ualm` as the entrypoint, every COPY source present."""
    tpu_vm = launcher("tpu_vm")
    ins = dockerfile_instructions((REPO / "Dockerfile").read_text())
    ops = [op for op, _ in ins]
    assert ops[0] == "FROM" and re.fullmatch(r"python:3\.1[1-9][-\w.]*", ins[0][1])
    assert ops.count("FROM") == 1
    runs = [(i, a) for i, (op, a) in enumerate(ins) if op == "RUN"]
    (i_deps, deps), = [(i, a) for i, a in runs if "-r requirements.lock" in a]
    assert "pip install" in deps and ("-r requirements-tpu.txt" in deps or "jax[tpu]" in deps)
    assert "jax[tpu]" in (REPO / "requirements-tpu.txt").read_text()
    assert f"-f {tpu_vm.LIBTPU_LINKS}" in deps and f"--extra-index-url {tpu_vm.TORCH_CPU_INDEX}" in deps
    (i_proj, proj), = [(i, a) for i, a in runs if "--no-deps" in a]
    assert "pip install --no-deps" in proj and proj.split()[-1] == "."
    copies = [(i, a.split()) for i, (op, a) in enumerate(ins) if op == "COPY"]
    (i_reqs, reqs), = [(i, a) for i, a in copies if "requirements.lock" in a]
    assert "requirements-tpu.txt" in reqs and i_reqs < i_deps
    (i_all, _), = [(i, a) for i, a in copies if a[0] == "."]
    assert i_deps < i_all < i_proj  # the pins' layer does not depend on the source
    for _, a in copies:
        assert all((REPO / src).exists() for src in a[:-1] if not src.startswith("--")), a
    (entry,) = [a for op, a in ins if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["ualm"]
    assert "ualm=ualm_jax.cli:main" in (REPO / "setup.py").read_text()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_tpu_vm_gs_run_dir_reaches_every_worker():
    for extra in ([], ["--detach"], ["--git-url", "https://example.com/u.git"]):
        out = dry("tpu_vm.py", "--name", "g", "--zone", "z", "--num-slices", "3", *extra,
                  "--config", "configs/demo.yaml", "--run-dir", "gs://b/run", *FIT)
        starts = [shlex.split(x) for x in out.splitlines() if "ualm train" in x]
        assert [c[5] for c in starts] == ["g-0", "g-1", "g-2"]
        for c in starts:
            assert "--worker=all" in c
            cmd = remote_command(c)
            assert " --run-dir gs://b/run " in cmd
            argv = shlex.split(cmd.split("&&")[-1])
            assert argv[argv.index("--run-dir") + 1] == "gs://b/run"


@pytest.mark.parametrize("remote_dir,where", [
    ("x; touch PWNED1", "x; touch PWNED1"),
    ("~/r $(touch PWNED2) `touch PWNED3` *", "r $(touch PWNED2) `touch PWNED3` *"),
])
def test_tpu_vm_remote_commands_keep_hostile_values_literal(tmp_path, remote_dir, where):
    """The install and run commands, executed by bash against stand-ins for python3, tar and
    ualm, get every value as one literal word: nothing is run that was not meant to be."""
    home, bin_, log = tmp_path / "home", tmp_path / "bin", tmp_path / "log"
    home.mkdir()
    bin_.mkdir()
    for name in ("python3", "tar"):
        argv_logger(bin_ / name, log)
    run_dir, override = "gs://b/$(touch PWNED4); x", f"{HOSTILE_KEY}=b; touch PWNED5"
    out = dry("tpu_vm.py", "--name", "h", "--zone", "z", "--remote-dir", remote_dir,
              "--python", "3.11; touch PWNED6", "--config", "configs/demo.yaml",
              "--run-dir", run_dir, *FIT, override)
    ssh = [shlex.split(x) for x in out.splitlines() if " ssh " in x]
    install, run = (remote_command(c) for c in ssh)
    env = {"HOME": str(home), "PATH": f"{bin_}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    for cmd in (install, run):
        res = subprocess.run(["bash", "-c", cmd], cwd=home, env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    assert not planted(tmp_path)
    d = home / where
    assert d.is_dir()
    calls = logged(log)
    tar_dir = str(d) if remote_dir.startswith("~/") else where  # ~ expanded, the rest literal
    assert calls[0]["argv"] == ["tar", "-xzf", f"{home}/ualm-jax.tar.gz", "-C", tar_dir]
    (venv,) = [c["argv"] for c in calls if c["argv"][1:4] == ["-m", "uv", "venv"]]
    assert venv[venv.index("--python") + 1] == "3.11; touch PWNED6"
    (train,) = [c for c in calls if c["argv"][0] == "ualm"]
    assert train["cwd"] == str(d) and train["dist"] == "1"
    assert train["argv"][1:] == ["train", "--config", "configs/demo.yaml", "--run-dir", run_dir,
                                 *FIT, override]
    # The detached form and the git path parse as shell too.
    for extra in (["--detach"], ["--git-url", "https://h/$(touch PWNED7).git",
                                 "--git-ref", "v1; touch PWNED8"]):
        out = dry("tpu_vm.py", "--name", "h", "--zone", "z", "--remote-dir", remote_dir, *extra,
                  "--config", CONFIG, "--run-dir", run_dir, *FIT)
        for c in (shlex.split(x) for x in out.splitlines() if " ssh " in x):
            res = subprocess.run(["bash", "-n", "-c", remote_command(c)], capture_output=True,
                                 text=True, timeout=30)
            assert res.returncode == 0, res.stderr
        if "--git-url" in extra:
            assert "git clone -q -- 'https://h/$(touch PWNED7).git'" in out.replace("'\"'\"'", "'")
    assert "--git-ref" in refused("tpu_vm.py", "--name", "h", "--zone", "z", "--git-url", "u",
                                  "--git-ref=--upload-pack=x", "--config", "c", "--run-dir", "r")


def slurm_stand_ins(tmp_path: Path) -> dict:
    """scontrol and srun stand-ins (as in test_slurm_script_wiring); the env to run under."""
    (tmp_path / "scontrol").write_text('#!/bin/bash\necho gpu-node-7\necho gpu-node-8\n')
    (tmp_path / "srun").write_text(
        '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
        'for ((i = 0; i < SLURM_NTASKS; i++)); do\n'
        '  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@"\ndone\n')
    for f in ("scontrol", "srun"):
        (tmp_path / f).chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_SUBMIT_DIR": str(tmp_path)}


def test_slurm_script_keeps_hostile_values_literal(tmp_path):
    env = slurm_stand_ins(tmp_path)
    log = tmp_path / "log"
    ualm = argv_logger(tmp_path / "my ualm; touch PWNED0", log)
    work = tmp_path / "w $(touch PWNED1); `touch PWNED2` *"
    work.mkdir()
    (tmp_path / "sub").mkdir()
    run_dir, override = "/r $(touch PWNED3)'", f"{HOSTILE_KEY}=1; touch PWNED4"
    for workdir, cwd in ((str(work), work), ("${UALM_T_ROOT}/sub", tmp_path / "sub"),
                         ("$SLURM_SUBMIT_DIR", tmp_path)):
        path, body, _ = file_and_commands(dry(
            "slurm.py", "--nodes", "2", "--gpus-per-node", "1", "--workdir", workdir,
            "--ualm", str(ualm), "--out", str(tmp_path / "job.sbatch"),
            "--config", ABS_CONFIG, "--run-dir", run_dir, *FIT, override,
            env={**os.environ, "UALM_T_ROOT": str(tmp_path)}))
        Path(path).write_text(body)
        assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
        log.unlink(missing_ok=True)
        out = subprocess.run(["bash", path], env={**env, "UALM_T_ROOT": str(tmp_path)},
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        calls = logged(log)
        assert [c["pid"] for c in calls] == ["0", "1"]
        for c in calls:
            assert c["cwd"] == str(cwd)
            assert c["argv"][1:] == ["train", "--config", ABS_CONFIG, "--run-dir", run_dir,
                                     *FIT, override]
    assert not planted(tmp_path)


def test_xpk_pod_script_keeps_hostile_values_literal(tmp_path):
    """The container's script after Kubernetes' own `$(VAR)` / `$$` expansion, run by bash:
    the user's values arrive exactly as given."""
    log = tmp_path / "log"
    ualm = argv_logger(tmp_path / "ualm", log)
    run_dir = "gs://b/$(touch PWNED1) `touch PWNED2`; $HOME $(JOBSET_NAME) $$"
    override = f"{HOSTILE_KEY}=$(SLICE_ID) 'q"
    text = dry("xpk.py", "--name", "h", "--image", "reg/u:1 # not a comment", "--num-slices", "2",
               "--ualm", str(ualm), "--config", CONFIG, "--run-dir", run_dir, *FIT, override)
    pod = manifest_pod(text)
    (c,) = pod["containers"]
    assert c["image"] == "reg/u:1 # not a comment"
    env = {"JOBSET_NAME": "h", "REPLICATED_JOB_NAME": "slice", "SLICE_ID": "1",
           "JOB_COMPLETION_INDEX": "2"}

    def k8s_expand(s: str) -> str:  # Kubernetes' rule for command/args
        return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                      lambda m: "$" if m.group() == "$$" else env.get(m.group(1), m.group()), s)

    script = k8s_expand(c["args"][0])
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60)
    assert res.returncode == 0, res.stderr
    (call,) = logged(log)
    assert call["pid"] == "18"  # slice 1 * 16 hosts + pod 2
    assert call["argv"][1:] == ["train", "--config", CONFIG, "--run-dir", run_dir, *FIT, override,
                                "mesh.dcn.data=2"]
    assert not planted(tmp_path)


@pytest.mark.parametrize("script,args,flag", [
    ("slurm.py", ["--job-name", "ualm\n#SBATCH --exclusive"], "--job-name"),
    ("slurm.py", ["--workdir", "/w\rx"], "--workdir"),
    ("slurm.py", ["--setup", "module load a\u2028b"], "--setup"),
    ("tpu_vm.py", ["--name", "n", "--zone", "z", "--remote-dir", "d\ntouch x"], "--remote-dir"),
    ("tpu_vm.py", ["--name", "n\n", "--zone", "z"], "--name"),
    ("xpk.py", ["--name", "n", "--image", "i\n  evil: 1"], "--image"),
    ("xpk.py", ["--name", "n", "--image", "i", "a=1\nb=2"], "override"),
    ("local.py", ["--port", "1", "a=\x1b[2J"], "override"),
])
def test_control_characters_are_refused(script, args, flag):
    line = refused(script, "--config", "c.yaml", "--run-dir", "gs://b/r", *args)
    assert flag in line and "control character" in line


def test_tpu_vm_tarball_is_staged_privately(tmp_path, launcher, monkeypatch):
    """The tarball is packed into a fresh 0700 directory that is gone afterwards, failure or
    not; a symlink planted at the old predictable /tmp name is never followed."""
    import stat
    import tempfile
    import uuid

    tpu_vm = launcher("tpu_vm")
    with tpu_vm.staging_dir() as a, tpu_vm.staging_dir() as b:
        assert a != b
        for d in (a, b):
            st = os.lstat(d)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
            assert st.st_uid == os.getuid()
            assert Path(d).parent == Path(tempfile.gettempdir())
    assert not os.path.exists(a) and not os.path.exists(b)

    name = f"t{uuid.uuid4().hex[:12]}"
    victim = tmp_path / "victim"
    old = Path(tempfile.gettempdir()) / f"ualm-jax-{name}.tar.gz"
    old.symlink_to(victim)
    try:
        real_run, seen = subprocess.run, []

        def fake_run(cmd, *a, **kw):  # pack for real (local only); no gcloud
            seen.append(cmd)
            if cmd[0] == "tar":
                stage = Path(cmd[2]).parent
                assert stat.S_IMODE(os.lstat(stage).st_mode) == 0o700
                return real_run(cmd, *a, **kw)
            if cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]:
                assert Path(cmd[5]).is_file() and not Path(cmd[5]).is_symlink()
                if fail:
                    raise subprocess.CalledProcessError(1, cmd)
            return subprocess.CompletedProcess(cmd, 0)

        monkeypatch.setattr(tpu_vm, "subprocess", fake_subprocess(fake_run, seen))
        argv = ["--name", name, "--zone", "z", "--reuse", "--num-slices", "2",
                "--config", "configs/demo.yaml", "--run-dir", "gs://b/r", *FIT]
        for fail in (False, True):
            seen.clear()
            if fail:
                with pytest.raises(subprocess.CalledProcessError):
                    tpu_vm.main(argv)
            else:
                assert tpu_vm.main(argv) == 0
            (pack,) = [c for c in seen if c[0] == "tar"]
            tarball = Path(pack[2])
            assert tarball.name == "ualm-jax.tar.gz" and name not in str(tarball)
            scps = [c for c in seen if "scp" in c]
            assert [c[5] for c in scps] == [str(tarball)] * (1 if fail else 2)
            assert not tarball.parent.exists()  # removed, with the tarball
            assert len([c for c in seen if "ualm train" in " ".join(c)]) == (0 if fail else 2)
        assert old.is_symlink() and not victim.exists()
    finally:
        old.unlink()


# --------------------------------------------------------------------------------------------
# Start-up decisions (no process group is joined here)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "UALM_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_maybe_initialize_single_host_is_a_no_op(clean_env):
    from ualm_jax.distributed import maybe_initialize

    assert maybe_initialize() is False
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    clean_env.setenv("JAX_PROCESS_ID", "0")
    assert maybe_initialize() is False  # one process: nothing to join
    clean_env.setenv("JAX_NUM_PROCESSES", "4")
    clean_env.setenv("UALM_DISTRIBUTED", "0")
    assert maybe_initialize() is False  # explicitly off


def test_maybe_initialize_names_missing_variables(clean_env):
    from ualm_jax.distributed import maybe_initialize

    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
        maybe_initialize()
    clean_env.setenv("JAX_NUM_PROCESSES", "two")
    clean_env.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        maybe_initialize()


# --------------------------------------------------------------------------------------------
# Two real processes
# --------------------------------------------------------------------------------------------

TINY = """\
model: {preset: tiny}
mesh: {ici: {data: 1, fsdp: -1, tensor: 1}}
train: {steps: 4, batch_size: 8, seq_len: 64, checkpoint_every: 2, eval_batches: 0,
        tensorboard: false, log_every: 1}
"""


def launch_local(config, run_dir, *overrides, timeout=150, processes=2, devices=2) -> str:
    """launch/local.py with `processes` x `devices` CPU devices; its whole process group is
    stopped on timeout so no child outlives the test."""
    p = subprocess.Popen([sys.executable, str(LAUNCH / "local.py"), "--num-processes",
                          str(processes), "--devices-per-process", str(devices),
                          "--config", str(config), "--run-dir", str(run_dir), *overrides],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True,
                         # Halves XLA:CPU compile time, most of this test; same numbers.
                         env={**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"})
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"two-process run timed out:\n{out[-4000:]}")
    assert p.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    from ualm_jax.config import load_config
    from ualm_jax.model.loss import shift_targets
    from ualm_jax.train.data import make_train_iterator

    config, run = tmp_path / "tiny.yaml", tmp_path / "run"
    config.write_text(TINY)
    first = launch_local(config, run, "train.steps=2")
    for i in (0, 1):
        assert f"[p{i}] distributed: process {i} of 2, 2 local / 4 global devices" in first
    assert (run / "checkpoints" / "2" / "state").is_dir()
    assert (run / "checkpoints" / "2" / "data").is_dir()

    second = launch_local(config, run)
    for i in (0, 1):
        assert f"[p{i}] resumed from step 2" in second
    assert (run / "checkpoints" / "4" / "state").is_dir()

    # Each process fed its own half of every global batch: the number of loss targets the
    # jitted step counted over the global batch equals that of the configured batch (rows 0-7,
    # steps 3-4 after restoring the iterator). Had a process fed the other's rows, one half
    # would count twice; the halves differ, so that would show.
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "target_tokens" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    stream = make_train_iterator(load_config(config))
    halves = []
    for rec in recs:
        b = next(stream)
        _, w = shift_targets(b["tokens"], b["loss_weights"], b["segment_ids"])
        per_row = np.asarray(w[..., 0] > 0).sum(axis=1)
        assert rec["target_tokens"] == per_row.sum(), rec["step"]
        assert np.isfinite(rec["loss"])
        halves.append((per_row[:4].sum(), per_row[4:].sum()))
    assert any(a != b for a, b in halves), halves


@pytest.mark.slow
def test_elastic_resume_on_other_process_counts_trains_every_example_once(tmp_path, capsys):
    """data.source=mixture, 8 CPU devices throughout: 2 processes x 4 devices train 2 steps, then
    1 process x 8 devices resumes for 2 more, then 4 processes x 2 devices finish at step 6. The
    examples trained over the whole run are exactly those of one uninterrupted process (the
    final checkpoints' per-row packer states are equal: same stream positions, same waiting
    examples), each step's loss is that run's, and the realised token shares are on target."""
    from data_pipelines.build import build
    from data_pipelines.grain_pipeline import make_config_iterator, realised_shares
    from data_pipelines.packing import block_slot
    from data_pipelines.tokenizer import train_tiny_bpe
    from ualm_jax.checkpoint import read_data_state
    from ualm_jax.config import load_config
    from ualm_jax.train.data import local_data_state
    from ualm_jax.train.loop import train

    rng = np.random.default_rng(0)
    words = "one two three four five six seven eight nine ten".split()
    for name, n_answer in (("short", 3), ("long", 12)):
        rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words, 4))},
                              {"role": "assistant", "content": " ".join(rng.choice(words, n_answer))}]}
                for _ in range(64)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tiny_bpe(words * 8, 280, str(tmp_path / "tok"))
    for name in ("short", "long"):
        build("text-sft", str(tmp_path / f"{name}.jsonl"), str(tmp_path / name), tokenizer=tok)
    mixture = (f"data: {{source: mixture, mixture: [{{name: short, path: '{tmp_path / 'short'}', "
               f"share: 0.6}}, {{name: long, path: '{tmp_path / 'long'}', share: 0.4}}]}}\n")
    config, run = tmp_path / "mix.yaml", tmp_path / "run"
    config.write_text(TINY.replace("steps: 4", "steps: 6").replace("seq_len: 64", "seq_len: 128")
                      .replace("mesh: {ici: {data: 1, fsdp: -1, tensor: 1}}",
                               "mesh: {ici: {data: 1, fsdp: 8, tensor: 1}}") + mixture)

    launch_local(config, run, "--stop-after", "2", processes=2, devices=4)
    saved = read_data_state(run)[1]
    assert saved["process_count"] == 2 and len(saved["processes"][0]["packers"]) == 4
    out = launch_local(config, run, "--stop-after", "2", processes=1, devices=8)
    assert "[p0] resumed from step 2" in out
    out = launch_local(config, run, processes=4, devices=2)
    assert all(f"[p{i}] resumed from step 4" in out for i in range(4))

    straight = train(load_config(config), tmp_path / "straight")
    assert straight["step"] == 6
    (s1, elastic), (s2, one) = read_data_state(run), read_data_state(tmp_path / "straight")
    assert s1 == s2 == 6 and elastic["process_count"] == 4
    rows_e, rows_1 = local_data_state(elastic)["packers"], local_data_state(one)["packers"]
    assert rows_e == rows_1

    def trained(rows):  # global stream indices placed in trained batches
        out = set()
        for g, p in rows.items():
            read = {j * 8 + block_slot(0, j, 8, int(g)) for j in range(p["next"])}
            out |= read - set(p["pending"])
        return out

    assert trained(rows_e) == trained(rows_1) and len(trained(rows_1)) == sum(
        p["examples"] for p in rows_1.values())
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                                  .splitlines()) if "loss" in r}
              for d in (run, tmp_path / "straight")]
    assert sorted(losses[0]) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert losses[0][step] == pytest.approx(losses[1][step], rel=1e-4), step
    shares = realised_shares(make_config_iterator(load_config(config), "train", 0, 1), 6)["shares"]
    assert shares["short"] == pytest.approx(0.6, abs=0.01)
    assert shares["long"] == pytest.approx(0.4, abs=0.01)

    # Where the run stands: examples consumed per task and epochs, from its checkpoint.
    from ualm_jax.cli import main

    capsys.readouterr()
    assert main(["mixture", "inspect", "--resume-from", str(run), "--batches", "1", "--json"]) == 0
    pos = json.loads(capsys.readouterr().out)["position"]
    consumed = {t["name"]: t["consumed"] for t in pos["tasks"]}
    assert pos["step"] == 6 and sum(consumed.values()) == len(trained(rows_1))
    assert all(t["epochs"] == pytest.approx(t["consumed"] / 64) for t in pos["tasks"])
