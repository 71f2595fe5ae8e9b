"""Launchers: every `--dry-run` prints the commands it would run; the SLURM script's env wiring
runs against stand-in `scontrol`/`srun`; multi-host start-up decisions; and a real two-process
`ualm train` on CPU (jax.distributed over localhost, gloo collectives) that checkpoints, resumes,
and trains on exactly the configured global batches."""
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
JAX_PIN = next(line.split("==")[1] for line in (REPO / "requirements.lock").read_text().splitlines()
               if line.startswith("jax=="))


def dry(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(LAUNCH / script), "--dry-run", *args],
                         capture_output=True, text=True, timeout=60)
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
            "heavy = [m for m in ('jax', 'numpy', 'yaml', 'ualm_jax') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    common = ["--config", "c.yaml", "--run-dir", "r", "--dry-run"]
    argvs = [[str(LAUNCH / "tpu_vm.py"), "--name", "n", "--zone", "z", *common],
             [str(LAUNCH / "xpk.py"), "--name", "n", "--image", "i", *common],
             [str(LAUNCH / "slurm.py"), *common],
             [str(LAUNCH / "local.py"), *common]]
    out = subprocess.run([sys.executable, "-c", code.format(argvs=argvs)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_tpu_vm_single_slice():
    out = dry("tpu_vm.py", "--name", "ualm-a", "--zone", "us-east5-a", "--config",
              "configs/demo.yaml", "--run-dir", "gs://bkt/run", "train.steps=10")
    cmds = [shlex.split(x) for x in out.splitlines()]
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
    assert f"'jax[tpu]=={JAX_PIN}'" in install
    assert "-r requirements.lock" in install and "pip install -q --no-deps -e ." in install
    assert "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html" in install
    run = remote_command(ssh[1])
    assert "UALM_DISTRIBUTED=1" in run
    assert train_argv(run)[1:] == [".venv/bin/ualm", "train", "--config", "configs/demo.yaml",
                                   "--run-dir", "gs://bkt/run", "train.steps=10"]
    assert "mesh.dcn" not in out


def test_tpu_vm_multislice_queued_resources():
    out = dry("tpu_vm.py", "--name", "ms", "--zone", "us-east5-a", "--num-slices", "2", "--spot",
              "--accelerator-type", "v5p-256", "--config", "configs/demo.yaml",
              "--run-dir", "gs://bkt/run")
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
              "--skip-install", "--config", "c.yaml", "--run-dir", "r", "mesh.dcn.fsdp=2")
    assert "mesh.dcn.data" not in out and "create" not in out and out.count("mesh.dcn.fsdp=2") == 2


def test_xpk_jobset_manifest():
    path, body, cmds = file_and_commands(dry(
        "xpk.py", "--name", "ualm-js", "--image", "reg/ualm:1", "--num-slices", "2",
        "--config", "configs/demo.yaml", "--run-dir", "gs://bkt/run", "train.steps=7"))
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
        "train.steps=7", "mesh.dcn.data=2"]
    # One slice: no Megascale variables, no DCN axis.
    _, body, _ = file_and_commands(dry("xpk.py", "--name", "one", "--image", "i",
                                       "--accelerator-type", "v5litepod-16", "--config", "c.yaml",
                                       "--run-dir", "r"))
    one = yaml.safe_load(body)["spec"]["replicatedJobs"][0]["template"]["spec"]
    (c,) = one["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if e["name"].startswith("MEGASCALE")]
    assert "mesh.dcn" not in c["args"][0]
    assert one["parallelism"] == 4
    assert one["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"


def test_xpk_workload_create_command():
    (cmd,) = [shlex.split(x) for x in dry(
        "xpk.py", "--submit", "xpk", "--cluster", "tpu-c", "--name", "w", "--image", "reg/u:1",
        "--num-slices", "2", "--config", "configs/demo.yaml", "--run-dir", "gs://b/r").splitlines()]
    assert cmd[:3] == ["xpk", "workload", "create"]
    for flag in ("--cluster=tpu-c", "--workload=w", "--tpu-type=v5p-128", "--num-slices=2",
                 "--docker-image=reg/u:1"):
        assert flag in cmd
    assert shlex.split(remote_command(cmd)) == [
        "UALM_DISTRIBUTED=1", "ualm", "train", "--config", "configs/demo.yaml", "--run-dir",
        "gs://b/r", "mesh.dcn.data=2"]


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
        "--config", "configs/demo.yaml", "--run-dir", "/shared/run", "train.steps=3"))
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
    args = "args: train --config configs/demo.yaml --run-dir /shared/run train.steps=3"
    assert tasks == [f"task {i}/{n} gpu-node-7:8476 local="
                     f"{i % tasks_per_node if per == 'gpu' else 'all'} {args}" for i in range(n)]


def test_local_dry_run():
    out = dry("local.py", "--num-processes", "3", "--devices-per-process", "2", "--port", "4321",
              "--config", "c.yaml", "--run-dir", "r", "train.steps=2")
    cmds = [shlex.split(x) for x in out.splitlines()]
    assert len(cmds) == 3
    for i, c in enumerate(cmds):
        m = c.index("-m")  # env K=V ... PYTHON -m ualm_jax.cli train ...
        env = dict(a.split("=", 1) for a in c[1:m - 1])
        assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:4321"
        assert env["JAX_NUM_PROCESSES"] == "3" and env["JAX_PROCESS_ID"] == str(i)
        assert env["JAX_PLATFORMS"] == "cpu"
        assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
        assert c[m + 1:] == ["ualm_jax.cli", "train", "--config", "c.yaml", "--run-dir", "r",
                             "train.steps=2"]


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


def launch_local(config, run_dir, *overrides, timeout=150) -> str:
    """launch/local.py with 2 processes x 2 CPU devices; its whole process group is stopped on
    timeout so no child outlives the test."""
    p = subprocess.Popen([sys.executable, str(LAUNCH / "local.py"), "--num-processes", "2",
                          "--devices-per-process", "2", "--config", str(config),
                          "--run-dir", str(run_dir), *overrides],
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
def test_two_processes_pack_their_own_mixture_shares_and_resume(tmp_path):
    """data.source=mixture: each process packs its own share of the built records; the checkpoint
    holds both iterator positions and each process resumes from its own."""
    from data_pipelines.build import build
    from data_pipelines.tokenizer import train_tiny_bpe

    rng = np.random.default_rng(0)
    words = "one two three four five six seven eight nine ten".split()
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words, 4))},
                          {"role": "assistant", "content": " ".join(rng.choice(words, 3))}]}
            for _ in range(64)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tiny_bpe(words * 8, 280, str(tmp_path / "tok"))
    build("text-sft", str(tmp_path / "sft.jsonl"), str(tmp_path / "sft"), tokenizer=tok)
    config, run = tmp_path / "mix.yaml", tmp_path / "run"
    config.write_text(TINY + f"data: {{source: mixture, mixture: [{{name: text, path: '{tmp_path / 'sft'}'}}]}}\n")

    launch_local(config, run, "train.steps=2")
    saved = json.loads((run / "checkpoints" / "2" / "data" / "metadata").read_text())  # Orbax JSON item
    assert saved["process_count"] == 2
    states = saved["processes"]
    assert [s["fingerprint"]["process_index"] for s in states] == [0, 1]
    assert all(s["fingerprint"]["process_count"] == 2 for s in states)
    assert all(s["counts"]["batches"] == 2 for s in states)

    second = launch_local(config, run)
    for i in (0, 1):
        assert f"[p{i}] resumed from step 2" in second
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
