"""The launchers check a launch before any cloud or cluster command (launch/preflight.py): a
typo'd key, a missing config, a mesh the slice cannot hold, a batch its hosts cannot split, a
local run dir on several hosts and data paths that are missing or never reach the workers are
each refused with one line naming the flag, file or key, and exit status 2, with or without
--dry-run. Also: the TPU VM install uses uv and the lock, its tarball holds only what git
tracks, and an xpk job reads a gs:// config (no image rebuild). Nothing trains or compiles."""
import os
import re
import shlex
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
import yaml
from paths import REPO, fake_subprocess

LAUNCH = REPO / "launch"
CONFIG = "configs/demo.yaml"  # in the repo, tracked; the overrides below make it fit the slices
# Synthetic data (no paths), and a mesh that fills whatever devices there are.
FIT = ["data.source=synthetic", "mesh.ici.data=1", "mesh.ici.fsdp=-1", "mesh.ici.tensor=1",
       "train.batch_size=16"]
TPU = ["--name", "n", "--zone", "z", "--accelerator-type", "v5p-8"]
XPK = ["--name", "n", "--image", "reg/u:1", "--accelerator-type", "v5p-8"]
SMALL_CONFIG = """\
model: {preset: tiny}
mesh: {ici: {data: 1, fsdp: -1, tensor: 1}}
train: {steps: 2, batch_size: 8, seq_len: 64}
"""


def launch(script: str, *args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """The launcher as a user runs it, from the repo root unless `cwd` says otherwise."""
    return subprocess.run([sys.executable, str(LAUNCH / script), *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd or REPO, env=env)


def refused(script: str, *args: str, cwd=None, env=None) -> str:
    """A launch that stops with exit status 2, prints nothing on stdout and one line on stderr;
    that line without its `launch/NAME.py: error: ` head."""
    out = launch(script, *args, cwd=cwd, env=env)
    assert out.returncode == 2 and not out.stdout, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    head = f"launch/{script}: error: "
    assert lines[0].startswith(head), lines[0]
    return lines[0][len(head):]


def dry(script: str, *args: str, cwd=None) -> str:
    out = launch(script, "--dry-run", *args, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def small(tmp_path) -> Path:
    """A valid config outside the repo (for the launchers that read it where they run)."""
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_CONFIG)
    return path


def every_launcher(small: Path, config: str | None = None, dry_run: bool = True):
    """(script, arguments before the overrides, cwd) of a good launch of each launcher; `config`
    replaces its config (the TPU launchers take one of the repo's, the others `small`)."""
    flag = ["--dry-run"] if dry_run else []
    repo_config, own = config or CONFIG, config or str(small)
    return [("tpu_vm.py", [*TPU, "--config", repo_config, "--run-dir", "gs://b/r", *flag], None),
            ("xpk.py", [*XPK, "--config", repo_config, "--run-dir", "gs://b/r", *flag], None),
            ("slurm.py", ["--nodes", "1", "--gpus-per-node", "4", "--config", own,
                          "--run-dir", "/shared/r", *flag], small.parent),
            ("local.py", ["--num-processes", "2", "--devices-per-process", "2", "--config",
                          own, "--run-dir", "runs/r", *flag], small.parent)]


# --------------------------------------------------------------------------------------------
# Good launches still print their plan
# --------------------------------------------------------------------------------------------


def test_good_launches_print_their_commands(small):
    for script, args, cwd in every_launcher(small):
        out = dry(script, *args, *FIT, cwd=cwd)
        assert "ualm" in out and "train" in out, (script, out)
        if script == "tpu_vm.py":
            lines = out.splitlines()
            assert lines[0].startswith("gcloud compute tpus tpu-vm create n ")
            assert len([x for x in lines if " ssh " in x]) == 2
        elif script == "xpk.py":
            assert out.splitlines()[-1] == "kubectl apply -f n.jobset.yaml"
        elif script == "slurm.py":
            assert out.splitlines()[-1] == "sbatch ualm-train.sbatch"
        else:
            assert len(out.splitlines()) == 2  # one `env ... train` line per process


# --------------------------------------------------------------------------------------------
# (a) a typo'd key, (b) a missing config
# --------------------------------------------------------------------------------------------


def test_a_typo_in_an_override_or_the_file_is_refused(small, tmp_path):
    for script, args, cwd in every_launcher(small):
        line = refused(script, *args, *FIT, "optim.learning_rat=1e-4", cwd=cwd)
        assert "optim.learning_rat" in line and "learning_rate" in line, (script, line)
    bad = tmp_path / "typo.yaml"
    bad.write_text(SMALL_CONFIG + "optim: {learning_rat: 1e-4}\n")
    for script, args in (("slurm.py", ["--nodes", "1", "--gpus-per-node", "8"]),
                         ("local.py", ["--devices-per-process", "4"])):
        line = refused(script, *args, "--config", str(bad), "--run-dir", "r", "--dry-run",
                       cwd=tmp_path)
        assert str(bad) in line and "learning_rat" in line, (script, line)


def test_a_missing_config_is_refused(small):
    for script, args, cwd in every_launcher(small, config="configs/nope.yaml"):
        line = refused(script, *args, *FIT, cwd=cwd)
        assert line.startswith("--config configs/nope.yaml: no such file"), (script, line)


def test_refused_without_dry_run_too_and_no_command_runs(tmp_path, small):
    """Stand-ins for gcloud, kubectl, xpk and sbatch log any call: none is made."""
    log = tmp_path / "calls"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("gcloud", "kubectl", "xpk", "sbatch"):
        (bin_ / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {shlex.quote(str(log))}\n")
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    for script, args, cwd in every_launcher(small, dry_run=False):
        out = ["--out", str(tmp_path / "job")] if script in ("xpk.py", "slurm.py") else []
        line = refused(script, *args, *out, *FIT, "optim.learning_rat=1", cwd=cwd, env=env)
        assert "optim.learning_rat" in line, (script, line)
    assert not log.exists(), log.read_text()
    assert not (tmp_path / "job").exists()  # nor is a manifest or script written
    # The stand-ins do log: a good launch without --dry-run reaches them.
    script, args, cwd = every_launcher(small, dry_run=False)[2]
    assert launch(script, *args, "--out", str(tmp_path / "job"), *FIT, cwd=cwd,
                  env=env).returncode == 0
    assert log.read_text().startswith("sbatch ")


# --------------------------------------------------------------------------------------------
# (c) the mesh against the slice; the batch against its hosts
# --------------------------------------------------------------------------------------------


def test_a_mesh_the_slice_cannot_hold_is_refused(small):
    mesh8 = ["mesh.ici.data=8", "mesh.ici.fsdp=1", "mesh.ici.tensor=1"]
    base = [*TPU, "--config", CONFIG, "--run-dir", "gs://b/r", "--dry-run"]
    # v5p-8 counts TensorCores: 4 chips, one JAX device each.
    assert refused("tpu_vm.py", *base, *FIT, *mesh8) == \
        "mesh sizes (mesh.ici.data=8) multiply to 8 but v5p-8 has 4 chips (4 devices)"
    assert "v5p-8 has 4 chips (4 devices)" in refused(
        "xpk.py", *XPK, "--config", CONFIG, "--run-dir", "gs://b/r", "--dry-run", *FIT, *mesh8)
    # v5e and v6e names count chips: 8 devices.
    for accel in ("v5litepod-8", "v6e-8"):
        dry("tpu_vm.py", *base, "--accelerator-type", accel, *FIT, *mesh8)
    assert "v4-32 has 16 chips (16 devices)" in refused(
        "tpu_vm.py", *base, "--accelerator-type", "v4-32", *FIT, *mesh8)
    # The one -1 size takes what is left, if the rest divides the devices.
    line = refused("tpu_vm.py", *base, *FIT, "mesh.ici.data=3")
    assert line == "mesh.ici.fsdp=-1 cannot be filled: the other mesh sizes multiply to 3, " \
                   "which does not divide the 4 devices: v5p-8 has 4 chips (4 devices)"
    assert "mesh.ici.fsdp, mesh.ici.tensor" in refused("tpu_vm.py", *base, *FIT,
                                                       "mesh.ici.tensor=-1")
    assert "mesh.ici.data=0" in refused("tpu_vm.py", *base, *FIT, "mesh.ici.data=0")
    # Several slices: the launcher's mesh.dcn.data=N counts; the devices of all slices too.
    dry("tpu_vm.py", *base, "--num-slices", "2", *FIT)
    assert refused("tpu_vm.py", *base, "--num-slices", "2", *FIT, *mesh8) == (
        "mesh sizes (mesh.ici.data=8, mesh.dcn.data=2) multiply to 16 but 2 slices of v5p-8 have "
        "8 chips (8 devices)")
    # GPUs and local CPU processes.
    assert "1 node x 8 GPUs give 8 devices" in refused(
        "slurm.py", "--config", str(small), "--run-dir", "/r", "--dry-run", "mesh.ici.fsdp=16",
        cwd=small.parent)
    assert "2 processes x 2 CPU devices give 4 devices" in refused(
        "local.py", "--config", str(small), "--run-dir", "r", "--dry-run", "mesh.ici.fsdp=8",
        cwd=small.parent)


def test_the_mesh_rule_is_the_trainers(launcher):
    """launch/preflight.py keeps ualm_jax/sharding.py's rule without importing jax: both accept
    and refuse the same meshes."""
    from ualm_jax.config import ConfigError, load_config
    from ualm_jax.sharding import resolve_axis_sizes

    preflight = launcher("tpu_vm").preflight  # as the launchers import it
    cases = [dict(data=8), dict(data=2, fsdp=-1), dict(fsdp=-1, tensor=3), dict(data=-1, tensor=-1),
             dict(data=0), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=-1, dcn_data=2),
             dict(dcn_data=-1, fsdp=2), dict(data=16, fsdp=1)]
    for case in cases:
        over = [f"mesh.ici.{k}={v}" for k, v in dict(data=1, fsdp=1, tensor=1).items()]
        over += [f"mesh.dcn.{k[4:]}={v}" if k.startswith("dcn_") else f"mesh.ici.{k}={v}"
                 for k, v in case.items()]
        mesh = load_config(None, over).mesh
        for devices in (1, 4, 8, 16):
            try:
                resolve_axis_sizes(mesh, devices)
                trainer = True
            except ConfigError:
                trainer = False
            target = preflight.Target("x", "x", devices, 1, REPO)
            try:
                preflight.check_mesh(target, mesh)
                ours = True
            except preflight.PreflightError:
                ours = False
            assert ours == trainer, (case, devices)


def test_a_batch_the_hosts_cannot_split_is_refused(small):
    base = ["--name", "n", "--zone", "z", "--config", CONFIG, "--run-dir", "gs://b/r",
            "--dry-run", "--accelerator-type", "v5p-16", *FIT]
    # v5p-16: 8 chips on 2 hosts; each host feeds an equal share of the rows.
    assert refused("tpu_vm.py", *base, "train.batch_size=9") \
        .startswith("train.batch_size=9 must be divisible by the 2 hosts of v5p-16")
    dry("tpu_vm.py", *base, "train.batch_size=10")
    line = refused("slurm.py", "--nodes", "2", "--gpus-per-node", "2", "--config", str(small),
                   "--run-dir", "/r", "--dry-run", "train.batch_size=6", cwd=small.parent)
    assert line.startswith("train.batch_size=6 must be divisible by the 4 processes")
    dry("slurm.py", "--nodes", "2", "--gpus-per-node", "2", "--per", "node", "--config",
        str(small), "--run-dir", "/r", "train.batch_size=6", cwd=small.parent)


# --------------------------------------------------------------------------------------------
# (d) the run dir of several hosts
# --------------------------------------------------------------------------------------------


def test_a_local_run_dir_on_several_hosts_is_refused():
    base = ["--config", CONFIG, "--dry-run"]
    line = refused("tpu_vm.py", "--name", "n", "--zone", "z", "--accelerator-type", "v5p-128",
                   *base, "--run-dir", "runs/x", *FIT)
    assert line.startswith("--run-dir runs/x: the 16 hosts of v5p-128") and "gs://" in line
    assert "2 slices of v5p-8" in refused("tpu_vm.py", *TPU, "--num-slices", "2", *base,
                                          "--run-dir", "/mnt/run", *FIT)
    dry("tpu_vm.py", *TPU, *base, "--run-dir", "runs/x", *FIT)  # one host: its own disk
    for one_host in ("v5litepod-8", "v6e-4"):  # single-host v5e/v6e machines hold up to 8 chips
        dry("tpu_vm.py", "--name", "n", "--zone", "z", "--accelerator-type", one_host, *base,
            "--run-dir", "runs/x", *FIT)
    assert "the 4 hosts of v5litepod-16" in refused(
        "tpu_vm.py", "--name", "n", "--zone", "z", "--accelerator-type", "v5litepod-16", *base,
        "--run-dir", "runs/x", *FIT)
    dry("tpu_vm.py", "--name", "n", "--zone", "z", *base, "--run-dir", "gs://b/run", *FIT)
    line = refused("xpk.py", "--name", "n", "--image", "i", "--accelerator-type", "v5p-16",
                   *base, "--run-dir", "/shared/run", *FIT)
    assert line.startswith("--run-dir /shared/run: the 2 hosts of v5p-16") and "--pvc" in line


# --------------------------------------------------------------------------------------------
# (e) data paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("data.tokenizer", "no/such/tokenizer.json"), ("data.codec", "/no/such/codec"),
    ("train.init_from", "runs/no-such-run"),
])
def test_missing_data_paths_are_refused(small, key, value):
    for script, args, cwd in every_launcher(small):
        line = refused(script, *args, *FIT, f"{key}={value}", cwd=cwd)
        assert line.startswith(f"{key}={value}: not found"), (script, line)


def test_missing_mixture_builds_are_refused(small, tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    mixture = (f"data.mixture=[{{name: a, path: {built}}}, {{name: b, path: {tmp_path}/gone}}]")
    for script, args in (("slurm.py", ["--nodes", "1", "--gpus-per-node", "8"]),
                         ("local.py", ["--devices-per-process", "4"])):
        line = refused(script, *args, "--config", str(small), "--run-dir", "r", "--dry-run",
                       "data.source=mixture", mixture, cwd=tmp_path)
        assert line.startswith(f"data.mixture[1].path={tmp_path}/gone: not found"), line
    # On a bucket: nothing to look for here (the config asks for a staging dir).
    dry("slurm.py", "--nodes", "1", "--gpus-per-node", "8", "--config", str(small), "--run-dir",
        "r", "data.source=mixture", "data.mixture=[{name: a, path: gs://b/built}]",
        "data.stage_dir=/tmp/stage", cwd=tmp_path)


def test_data_that_never_reaches_the_workers_is_refused(tmp_path):
    here = tmp_path / "tok.json"  # exists here, outside the repo
    here.write_text("{}")
    base = ["--config", CONFIG, "--run-dir", "gs://b/r", "--dry-run"]
    line = refused("tpu_vm.py", *TPU, *base, *FIT, f"data.tokenizer={here}")
    assert line.startswith(f"data.tokenizer={here}: is a path on this machine") and "gs://" in line
    line = refused("tpu_vm.py", *TPU, *base, *FIT, f"data.tokenizer={REPO / 'README.md'}")
    assert "is a path on this machine" in line  # the workers have the repo elsewhere
    line = refused("xpk.py", *XPK, *base, *FIT, f"data.tokenizer={here}")
    assert line.startswith(f"data.tokenizer={here}: is not in the image") and "gs://" in line
    # A folder .dockerignore keeps out of the image (here: the venv the tests run in).
    venv = Path(sys.executable).parent.parent
    if venv.parent == REPO:
        rel = f"{venv.name}/bin/{Path(sys.executable).name}"
        assert "left out of the image by .dockerignore" in refused(
            "xpk.py", *XPK, *base, *FIT, f"data.tokenizer={rel}")
    # Tracked by git: shipped to TPU VMs, in the image.
    dry("tpu_vm.py", *TPU, *base, *FIT, "data.tokenizer=README.md")
    dry("xpk.py", *XPK, *base, *FIT, "data.tokenizer=/app/README.md")
    assert "is not in the image" in refused("xpk.py", *XPK, *base, *FIT,
                                            f"data.tokenizer={REPO / 'README.md'}")
    # Only on the workers (a disk mounted there, a --pvc volume): not looked for.
    dry("tpu_vm.py", *TPU, *base, "--skip-path-check", *FIT, "data.tokenizer=/mnt/disks/t.json")
    dry("xpk.py", *XPK, *base, "--skip-path-check", *FIT, "data.tokenizer=/data/tok.json")
    dry("xpk.py", *XPK, *base, "--pvc", "data:/data", *FIT, "data.tokenizer=/data/tok.json")
    line = refused("xpk.py", *XPK, "--config", "/tmp/elsewhere.yaml", "--run-dir", "gs://b/r",
                   "--dry-run", *FIT)
    assert line.startswith("--config /tmp/elsewhere.yaml is not in the image") and "gs://" in line


# --------------------------------------------------------------------------------------------
# (f) the TPU VM install, (g) what is shipped
# --------------------------------------------------------------------------------------------


def test_tpu_vm_installs_the_lock_with_uv_as_the_makefile():
    out = dry("tpu_vm.py", *TPU, "--config", CONFIG, "--run-dir", "gs://b/r", *FIT)
    (install,) = [shlex.split(x) for x in out.splitlines() if " ssh " in x and "install" in x]
    script = next(a for a in install if a.startswith("--command="))
    steps = [s.strip() for s in script[len("--command="):].split("&&")]
    uv_version = re.search(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    assert f"python3 -m pip install -q --user uv=={uv_version}" in steps
    installs = [shlex.split(s) for s in steps if " pip install" in s and "--user uv==" not in s]
    assert len(installs) == 2 and all(s[:5] == ["python3", "-m", "uv", "pip", "install"]
                                      for s in installs)
    deps, project = installs
    assert deps[deps.index("--python") + 1] == ".venv/bin/python"
    reqs = [deps[i + 1] for i, a in enumerate(deps) if a == "-r"]
    assert reqs == ["requirements.lock", "requirements-tpu.txt"]
    assert not [a for a in deps if a.startswith("jax")]  # jax[tpu] comes pinned from the file
    assert project[-3:] == ["--no-deps", "-e", "."]
    assert all((REPO / r).is_file() for r in reqs)


def git_repo(root: Path) -> Path:
    """A git checkout with tracked code and config, an untracked data folder and config."""
    (root / "configs").mkdir(parents=True)
    (root / "pkg").mkdir()
    (root / "pkg" / "code.py").write_text("x = 1\n")
    (root / "configs" / "base.yaml").write_text("train: {steps: 3}\n")
    (root / "configs" / "run.yaml").write_text(SMALL_CONFIG + "base: base.yaml\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"\0" * 1000)
    (root / "configs" / "mine.yaml").write_text("base: run.yaml\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "pkg", "configs/base.yaml", "configs/run.yaml"],
                   check=True)
    return root


def test_only_tracked_files_and_the_config_are_shipped(tmp_path, launcher, monkeypatch):
    repo = git_repo(tmp_path / "repo")
    tpu_vm = launcher("tpu_vm")
    configs = [repo / "configs" / "mine.yaml", repo / "configs" / "run.yaml",
               repo / "configs" / "base.yaml"]
    files, untracked = tpu_vm.shipped_files(repo, configs)
    assert files == ["configs/base.yaml", "configs/mine.yaml", "configs/run.yaml", "pkg/code.py"]
    assert untracked == ["configs/mine.yaml"]

    # The real pack of a real (stand-in gcloud) launch: the tarball holds exactly those files.
    monkeypatch.setattr(tpu_vm, "REPO", repo)
    monkeypatch.chdir(repo)
    seen, held = [], {}

    def fake_run(cmd, *a, **kw):
        seen.append(cmd)
        if cmd[0] == "tar":
            subprocess.run(cmd, check=True)
            with tarfile.open(cmd[2]) as t:
                held["names"] = sorted(os.path.normpath(n) for n in t.getnames())
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tpu_vm, "subprocess", fake_subprocess(fake_run, seen))
    argv = [*TPU, "--reuse", "--config", "configs/mine.yaml", "--run-dir", "gs://b/r"]
    assert tpu_vm.main(argv) == 0
    assert held["names"] == files
    assert [c for c in seen if "ualm train" in " ".join(c)]

    # A data path in the untracked folder exists here but would not be on the workers.
    with pytest.raises(SystemExit) as e:
        tpu_vm.main([*argv, "--dry-run", "data.tokenizer=data/big.bin"])
    assert e.value.code == 2
    # With --git-url the workers clone: an untracked config is not in the clone.
    with pytest.raises(SystemExit) as e:
        tpu_vm.main([*argv, "--dry-run", "--git-url", "https://example.com/r.git"])
    assert e.value.code == 2


def test_tpu_vm_dry_run_says_what_it_ships_and_help_says_where_data_lives():
    out = dry("tpu_vm.py", *TPU, "--config", CONFIG, "--run-dir", "gs://b/r", *FIT)
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True,
                             text=True, check=True).stdout.split()
    n = len([t for t in tracked if os.path.lexists(REPO / t)])
    assert f"# the tarball: the {n} files git tracks" in out
    (pack,) = [shlex.split(x) for x in out.splitlines() if x.startswith("tar ")]
    assert pack[pack.index("-T") - 1] == "--null" and "." not in pack  # a list, not the tree
    text = " ".join(launch("tpu_vm.py", "--help").stdout.split())
    assert "data must be on a bucket (gs://" in text and "baked in" in text
    assert "files git tracks" in text


# --------------------------------------------------------------------------------------------
# (h) xpk: a gs:// config, read by the pods, needs no image rebuild
# --------------------------------------------------------------------------------------------


def upload(gcs, bucket: str, name: str, data: bytes) -> None:
    req = urllib.request.Request(f"{gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=media"
                                 f"&name={name}", data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req, timeout=10)


def test_xpk_takes_a_gs_config_without_a_rebuild(gcs):
    bucket = gcs.make_bucket("ualm-launch")
    upload(gcs, "ualm-launch", "cfg/run.yaml", SMALL_CONFIG.encode())
    url = f"{bucket}/cfg/run.yaml"
    out = dry("xpk.py", *XPK, "--config", url, "--run-dir", f"{bucket}/run", "train.steps=5")
    body = out.partition("# end of file\n")[0].partition("\n")[2]
    job = yaml.safe_load(body)["spec"]["replicatedJobs"][0]["template"]["spec"]
    (c,) = job["template"]["spec"]["containers"]
    argv = shlex.split(c["args"][0].split("exec ", 1)[1])
    assert argv[:4] == ["ualm", "train", "--config", url] and "train.steps=5" in argv
    # The pods load it as the check did: ualm_jax reads gs:// configs itself.
    from ualm_jax.config import load_config

    assert load_config(url, ["train.steps=5"]).train.steps == 5
    # The bucket's copy is what is checked.
    bad = SMALL_CONFIG + "optim: {learning_rat: 1}\n"
    upload(gcs, "ualm-launch", "cfg/bad.yaml", bad.encode())
    line = refused("xpk.py", *XPK, "--config", f"{bucket}/cfg/bad.yaml", "--run-dir",
                   f"{bucket}/run", "--dry-run")
    assert "learning_rat" in line and "cfg/bad.yaml" in line
    line = refused("xpk.py", *XPK, "--config", f"{bucket}/cfg/none.yaml", "--run-dir",
                   f"{bucket}/run", "--dry-run")
    assert "cfg/none.yaml" in line and "does not exist" in line
    text = " ".join(launch("xpk.py", "--help").stdout.split())
    assert "gs:// URL the pods read at start" in text and "no image rebuild" in text
