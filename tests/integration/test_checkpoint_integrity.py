"""Checkpoint integrity: every step carries checksums.sha256; a flipped byte, a truncated file
or a deleted file of the newest step makes every reader (export, inspect, generate,
load_params) fail with one line naming the step and the file, and the trainer's restore fall
back to the newest step that verifies (saying so), or refuse when none does."""
import shutil
import threading

import jax
import numpy as np
import pytest

import ualm_jax.checkpoint as checkpoint_lib
from ualm_jax import cli
from ualm_jax.checkpoint import (CHECKSUMS, Checkpointer, CorruptCheckpoint, load_params,
                                 resolve, save_params, verify_step)
from ualm_jax.config import load_config
from ualm_jax.train.loop import train

BASE = ["model.preset=tiny", "train.batch_size=8", "train.seq_len=64", "train.log_every=1",
        "train.eval_batches=0", "train.checkpoint_every=1", "train.tensorboard=false",
        "optim.warmup_steps=2", "optim.learning_rate=1e-2", "mesh.ici.fsdp=8"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny run trained two steps, a checkpoint at each; and the state to compare with."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    two = train(load_config(None, BASE + ["train.steps=2"]), run)["state"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            two)
    one = Checkpointer(run / "checkpoints", read_only=True).restore(abstract, step=1)[0]
    return run, abstract, one, two


@pytest.fixture
def run(pristine, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(pristine[0], dst)
    return dst


def _largest(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def damage(run, kind: str, step: int = 2) -> str:
    """Damages step `step` of the run; returns the name the error must carry."""
    d = run / "checkpoints" / str(step)
    if kind == "flip":
        f = _largest(d / "state" / "ocdbt.process_0" / "d")
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        return f"{f.relative_to(d).as_posix()} (sha256 mismatch)"
    if kind == "truncate":
        f = _largest(d / "state" / "ocdbt.process_0" / "d")
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
        return f"{f.relative_to(d).as_posix()} (truncated"
    if kind == "state":
        shutil.rmtree(d / "state")
        return "state/ (missing)"
    target = d / kind
    if target.is_dir():  # a data folder: its largest file
        target = _largest(target)
    target.unlink()
    return f"{target.relative_to(d).as_posix()} (missing)"


# Every kind of file a train-state step holds (a folder: its largest file), the whole state
# item, a flipped byte and a truncated array file.
KINDS = ["flip", "truncate", "state", "_CHECKPOINT_METADATA", "commit_success.txt",
         "data/metadata", "data/commit_success.txt", "state/_METADATA", "state/manifest.ocdbt",
         "state/commit_success.txt", "state/ocdbt.process_0/manifest.ocdbt",
         "state/ocdbt.process_0/d", "state/d"]


def test_every_step_carries_checksums_that_verify(pristine):
    run = pristine[0]
    for step in (1, 2):
        d = run / "checkpoints" / str(step)
        assert verify_step(d) is True
        listed = [line.split("  ")[-1] for line in (d / CHECKSUMS).read_text().splitlines()
                  if not line.startswith("#")]
        assert set(listed) | {CHECKSUMS} == {p.relative_to(d).as_posix() for p in d.rglob("*")
                                             if p.is_file()}


def _one_line_error(capsys, argv, expect: str) -> str:
    assert cli.main(argv) == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines()
             if not x.startswith("warning: ")]  # an unverified step's warning comes first
    err = "\n".join(lines)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "checkpoint step 2 of" in err and expect in err, err
    return err


@pytest.mark.parametrize("kind", KINDS)
def test_readers_fail_in_one_line_and_restore_falls_back(kind, run, pristine, capsys, tmp_path):
    expect = damage(run, kind)
    # export, inspect, generate: one line naming the step and the file, exit 2, nothing written.
    err = _one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "out")], expect)
    assert "older steps: 1" in err
    assert not (tmp_path / "out").exists()
    _one_line_error(capsys, ["inspect", str(run)], expect)
    _one_line_error(capsys, ["inspect", str(run / "checkpoints" / "2")], expect)
    _one_line_error(capsys, ["generate", "--checkpoint", str(run), "--task", "text-to-audio",
                             "--prompt", "a tone", "--out", str(tmp_path / "o.wav")], expect)
    with pytest.raises(CorruptCheckpoint, match="checkpoint step 2 of"):
        load_params(run)
    # The trainer's restore: says what it skips, moves it aside, restores step 1 exactly.
    _, abstract, one, _ = pristine
    ck = Checkpointer(run / "checkpoints")
    state, data, step = ck.restore(abstract)
    out = capsys.readouterr().out
    assert step == 1 and data == {"step": 1}
    assert f"checkpoint step 2 of {run / 'checkpoints'} is corrupt: {expect}" in out, out
    assert "falling back to step 1" in out and "2 -> 2.corrupt" in out, out
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(one)))
    assert ck.all_steps() == [1] and (run / "checkpoints" / "2.corrupt").is_dir()
    ck.close()
    # Readers now read step 1.
    assert resolve(run)[2] == 1


def test_train_resumes_from_the_newest_good_step_and_saves_the_bad_one_again(run, capsys):
    damage(run, "flip")
    summary = train(load_config(None, BASE + ["train.steps=3"]), run)
    out = capsys.readouterr().out
    assert "checkpoint step 2 of" in out and "(sha256 mismatch): skipped" in out
    assert "falling back to step 1" in out and "resumed from step 1" in out
    assert summary["step"] == 3
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [1, 2, 3]
    for s in (2, 3):
        assert verify_step(run / "checkpoints" / str(s)) is True


def test_train_refuses_when_no_step_verifies(run, capsys):
    damage(run, "flip", 2)
    damage(run, "state/manifest.ocdbt", 1)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cli.main(["train", "--run-dir", str(run), *BASE, "train.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no checkpoint step of" in err and "step 2:" in err and "step 1:" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing moved


def test_a_step_without_checksums_is_read_unverified_with_a_warning(run, pristine, capsys):
    (run / "checkpoints" / "2" / CHECKSUMS).unlink()
    params = load_params(run)
    err = capsys.readouterr().err
    assert f"checkpoint step 2 of {run / 'checkpoints'} has no {CHECKSUMS}" in err, err
    assert "read unverified" in err
    two = pristine[3]
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(two["params"])))
    assert cli.main(["inspect", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint step 2 of {run / 'checkpoints'} has no {CHECKSUMS}" in err, err
    _, data, step = Checkpointer(run / "checkpoints", read_only=True).restore(pristine[1])
    assert step == 2 and data == {"step": 2}


def test_an_unverified_step_orbax_cannot_read_is_one_line_not_a_traceback(run, pristine, capsys):
    d = run / "checkpoints" / "2"
    (d / CHECKSUMS).unlink()
    (d / "state" / "_METADATA").unlink()  # Orbax: AttributeError 'NoneType' ... 'tree'
    _one_line_error(capsys, ["inspect", str(run)], "state (unreadable")
    _one_line_error(capsys, ["export", str(run), "--out", str(run.parent / "o")], "unreadable")
    ck = Checkpointer(run / "checkpoints")
    _, _, step = ck.restore(pristine[1])
    assert step == 1 and "falling back to step 1" in capsys.readouterr().out
    ck.close()


def test_params_only_checkpoints_carry_checksums(tmp_path):
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, np.float32)}
    save_params(tmp_path / "checkpoints", params)
    assert verify_step(tmp_path / "checkpoints" / "0") is True
    f = _largest(tmp_path / "checkpoints" / "0" / "state" / "ocdbt.process_0" / "d")
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint step 0 of .* is corrupt: state/"):
        load_params(tmp_path)


def test_checksums_are_written_in_the_background_before_the_commit(tmp_path, monkeypatch):
    gate, real = threading.Event(), checkpoint_lib.write_checksums
    monkeypatch.setattr(checkpoint_lib, "write_checksums", lambda d: (gate.wait(120), real(d)))
    ck = Checkpointer(tmp_path / "checkpoints")
    ck.save(1, {"w": np.arange(1 << 20, dtype=np.float32)}, {"pos": 1})
    # save() returned while the checksums are still held back: the step is not committed yet.
    assert not (tmp_path / "checkpoints" / "1").exists()
    gate.set()
    ck.close()
    assert verify_step(tmp_path / "checkpoints" / "1") is True


def test_checksums_on_object_storage(gcs, tmp_path):
    """gs://: written before commit_success.txt, checked by readers; a rewritten object fails."""
    from ualm_jax import storage

    url = f"{gcs.make_bucket('ualm-integrity')}/run"
    ck = Checkpointer(f"{url}/checkpoints")
    ck.save(1, {"params": {"w": np.arange(64, dtype=np.float32)}}, {"pos": 1})
    ck.save(2, {"params": {"w": np.arange(64, dtype=np.float32) + 1}}, {"pos": 2})
    ck.close()
    assert "run/checkpoints/2/" + CHECKSUMS in gcs.objects("ualm-integrity", "run/checkpoints/2/")
    assert verify_step(f"{url}/checkpoints/2") is True
    assert np.array_equal(load_params(url)["w"], np.arange(64, dtype=np.float32) + 1)
    names = [n for n in storage.files_under(f"{url}/checkpoints/2") if "/d/" in n]
    victim = storage.as_path(f"{url}/checkpoints/2") / max(names)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint step 2 of .* is corrupt: state/.*"
                                                r"\(sha256 mismatch\)"):
        load_params(url)
    abstract = {"params": {"w": jax.ShapeDtypeStruct((64,), np.float32)}}
    state, data_state, step = Checkpointer(f"{url}/checkpoints").restore(abstract)
    assert step == 1 and data_state == {"pos": 1}
    assert Checkpointer(f"{url}/checkpoints", read_only=True).all_steps() == [1]
