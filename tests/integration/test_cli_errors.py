"""One error path for the CLI: an expected failure (bad file, bad field, full disk, a file where a
folder should be) is one stderr line naming the file or key with exit code 2; `--debug` (or
UALM_DEBUG=1) shows the traceback; a failed import or export leaves nothing that blocks a rerun."""
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ualm_jax.cli import main as cli  # noqa: E402
from paths import REPO  # noqa: E402

TINY = ["model.preset=tiny", "model.dtype=float32"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from test_convert import make_hf

    path = tmp_path_factory.mktemp("hf") / "hf"
    make_hf(path, False)
    return path


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    assert cli(["import-hf", str(hf), "--out", str(out)] + TINY) == 0
    return out


def one_error_line(capsys, command):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"ualm {command}: error: "), err
    return err[0]


def copy_hf(hf, dest):
    dest.mkdir()
    for p in hf.iterdir():
        shutil.copyfile(p, dest / p.name)
    return dest


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_bad_safetensors_is_one_line_and_the_import_reruns(hf, tmp_path, capsys, kind):
    bad = copy_hf(hf, tmp_path / "src")
    data = (hf / "model.safetensors").read_bytes()
    body = {"truncated": data[:len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[kind]
    (bad / "model.safetensors").write_bytes(body)
    out = tmp_path / "out"
    cmd = ["import-hf", str(bad), "--out", str(out)] + TINY
    assert cli(cmd) == 2
    assert str(bad / "model.safetensors") in one_error_line(capsys, "import-hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written
    shutil.copyfile(hf / "model.safetensors", bad / "model.safetensors")  # fix the input
    assert cli(cmd) == 0
    assert (out / "import_report.json").is_file() and (out / "checkpoints").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left


@pytest.mark.parametrize("field,value", [("hidden_size", "64"), ("num_hidden_layers", 2.5),
                                         ("rms_norm_eps", "1e-6"), ("tie_word_embeddings", "false")])
def test_wrong_config_field_type_names_field_and_file(hf, tmp_path, capsys, field, value):
    bad = copy_hf(hf, tmp_path / "src")
    conf = json.loads((hf / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(conf, **{field: value})))
    assert cli(["import-hf", str(bad), "--out", str(tmp_path / "out")] + TINY) == 2
    line = one_error_line(capsys, "import-hf")
    assert field in line and str(bad / "config.json") in line, line
    assert not (tmp_path / "out").exists()


def test_config_json_not_an_object(hf, tmp_path, capsys):
    bad = copy_hf(hf, tmp_path / "src")
    (bad / "config.json").write_text("[1, 2]")
    assert cli(["import-hf", str(bad), "--out", str(tmp_path / "out")] + TINY) == 2
    assert str(bad / "config.json") in one_error_line(capsys, "import-hf")


def test_debug_flag_and_env_show_the_traceback(hf, tmp_path, monkeypatch):
    bad = copy_hf(hf, tmp_path / "src")
    (bad / "model.safetensors").write_bytes(b"")
    cmd = ["import-hf", str(bad), "--out", str(tmp_path / "out")] + TINY
    with pytest.raises(ValueError, match="model.safetensors"):
        cli(["--debug"] + cmd)
    with pytest.raises(ValueError, match="model.safetensors"):
        cli(cmd + ["--debug"])
    monkeypatch.setenv("UALM_DEBUG", "1")
    with pytest.raises(ValueError, match="model.safetensors"):
        cli(cmd)


def test_unexpected_errors_keep_their_traceback(ckpt, tmp_path, monkeypatch):
    def bug(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr("ualm_jax.convert.export.export", bug)
    with pytest.raises(TypeError, match="a bug"):
        cli(["export", str(ckpt), "--out", str(tmp_path / "pt")])


def test_export_onto_a_file(ckpt, tmp_path, capsys):
    target = tmp_path / "pt"
    target.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert cli(["export", str(ckpt), "--out", str(target)] + extra) == 2
        assert str(target) in one_error_line(capsys, "export")
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt"]


def test_no_space_simulated(ckpt, tmp_path, capsys, monkeypatch):
    """ENOSPC raised by the writer (in-process stand-in for a full disk, runs without root)."""
    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr("safetensors.numpy.save_file", full)
    assert cli(["export", str(ckpt), "--out", str(tmp_path / "pt")]) == 2
    line = one_error_line(capsys, "export")
    assert "no space left on device" in line and str(tmp_path) in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real full disk: a tmpfs of a given size (needs root and mount; else skipped)."""
    mounts = []

    def make(size):
        path = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("torch_bin", [False, True])
def test_export_into_a_full_disk(ckpt, small_disk, capsys, torch_bin):
    # The tiny export: model.safetensors ~760 kB, pytorch_model.bin ~770 kB. With --torch-bin the
    # safetensors file fits and torch.save runs out of space.
    disk = small_disk("1200k" if torch_bin else "256k")
    out = disk / "pt"
    cmd = ["export", str(ckpt), "--out", str(out)] + (["--torch-bin"] if torch_bin else [])
    assert cli(cmd) == 2
    line = one_error_line(capsys, "export")
    assert f"no space left on device writing {disk}" in line, line
    assert list(disk.iterdir()) == []  # nothing left behind: a rerun with space works


def test_import_into_a_full_disk_then_rerun(hf, small_disk, capfd):
    disk = small_disk("64k")
    out = disk / "imported"
    cmd = ["import-hf", str(hf), "--out", str(out)] + TINY
    assert cli(cmd) == 2
    captured = capfd.readouterr()
    line = [x for x in captured.err.splitlines() if x.startswith("ualm import-hf: error: ")]
    assert line and f"no space left on device writing {out}" in line[0], captured.err
    assert "Event loop is closed" not in captured.err
    assert list(disk.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    assert cli(cmd) == 0
    assert (out / "import_report.json").is_file()


def test_subprocess_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ualm_jax.cli", "export", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "pt")], capture_output=True, text=True,
                       cwd=str(REPO))
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and str(tmp_path / "missing") in lines[0], r.stderr


def test_closed_loop_echoes_after_an_error_are_dropped(tmp_path):
    """After an expected error, 'Event loop is closed' echoes from callbacks and threads (orbax /
    tensorstore futures completing on a loop already closed) print nothing; other errors do."""
    script = f"""
import sys, threading
from ualm_jax.cli import main
rc = main(["export", {str(tmp_path / "missing")!r}, "--out", {str(tmp_path / "pt")!r}])

class Echo:
    def __del__(self):
        raise RuntimeError("Event loop is closed")

Echo()
def boom():
    raise RuntimeError("Event loop is closed")
t = threading.Thread(target=boom); t.start(); t.join()

class Other:
    def __del__(self):
        raise RuntimeError("another problem")

Other()
sys.exit(rc)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=str(REPO))
    assert r.returncode == 2, r.stderr
    assert "Event loop is closed" not in r.stderr
    assert "another problem" in r.stderr  # anything else still shows
    assert r.stderr.splitlines()[0].startswith("ualm export: error: ")
