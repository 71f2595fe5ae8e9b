"""The README's commands: every `ualm` line in its shell blocks is a valid invocation, and its main
path works in README order from a fresh checkout at toy sizes (configs copied into an empty
folder; nothing built before `ualm demo`), `ualm demo` end to end included (the plumbing; the
README states the numbers of the full-size run)."""
import json
import re
import shlex
import shutil

import pytest

from paths import REPO
from ualm_jax.cli import build_parser, main, parse_args


def readme_commands() -> list[list[str]]:
    """`ualm ...` lines of the ```bash blocks of README.md and every docs/*.md page: continuation
    lines joined, comments, [optional] parts and `.venv/bin/` / `$U` prefixes dropped; lines
    abbreviated with `...` skipped."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            line = re.sub(r"\[[^\]]*\]", " ", line)
            words = shlex.split(line) if line else []
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if not words or words[0] not in ("ualm", ".venv/bin/ualm", "$U"):
                continue
            if "..." in words or any(w.startswith("...") for w in words):
                continue
            out.append(words[1:])
    return out


def test_every_readme_command_parses():
    commands = readme_commands()
    assert len(commands) > 25
    for argv in commands:
        try:
            parse_args(build_parser(), argv)
        except SystemExit as e:  # argparse rejected it
            pytest.fail(f"README command `ualm {' '.join(argv)}` does not parse (exit {e.code})")


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def ualm(capsys, monkeypatch):
    """Runs `ualm ARGS` in this process (8 CPU devices, as `make`) from the folder `cwd`."""
    def run(cwd, *args):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)
    return run


TOY = ["train.log_every=1", "train.tensorboard=false", "train.eval_batches=1"]


@pytest.mark.slow
def test_readme_order_from_a_fresh_checkout(tmp_path, ualm):
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "configs", clone / "configs")
    # Before the demo built anything: one line that says what to run first.
    r = ualm(clone, "train", "--config", "configs/demo.yaml", "--run-dir", "runs/x", *TOY)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [x for x in r.stderr.splitlines() if x.startswith("ualm")]
    assert len(err) == 1 and "make demo" in err[0], r.stderr[-2000:]
    # make demo (toy size): world -> built data -> mixture training over 8 devices -> results
    # table, results.json, plots, PyTorch export
    demo = ["demo", "--run-dir", "runs/demo", "--clips", "12", "--problems", "20",
            "--eval-items", "2", "train.steps=2", *TOY]
    r = ualm(clone, *demo)
    assert r.returncode == 0, r.stderr[-3000:]
    for text in ("held-out loss and stream-0 token accuracy after 2 steps", "text-to-audio cfg 3",
                 "audio QA", "PyTorch export:", "demo finished"):
        assert text in r.stdout, text
    run = clone / "runs" / "demo"
    results = json.loads((run / "results.json").read_text())
    assert [m["name"] for m in results["mixture"]] == ["caption", "audio_qa", "t2a", "text_sft"]
    assert {e["cfg_scale"] for e in results["world"]["t2a"]} == {1.0, 1.5, 3.0}
    for name in ("losses.png", "mixture.png", "spectrograms.png"):
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "export" / "ualm_config.json").is_file() and (run / "checkpoints" / "2").is_dir()
    # A rerun finds the data ready and the run finished: it re-evaluates without training.
    r = ualm(clone, *demo)
    assert r.returncode == 0 and "demo finished" in r.stdout and "step 1/2" not in r.stdout
    again = json.loads((run / "results.json").read_text())  # the rerun reports the same run
    assert again["eval"] == results["eval"] and again["eval"] is not None
    assert again["first_loss"] == results["first_loss"] and again["first_loss"] is not None
    # ualm train --config configs/demo.yaml from another directory: the mixture paths resolve
    # from the config file, the build's tokenizer and codec are recorded in the run.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = ualm(elsewhere, "train", "--config", clone / "configs" / "demo.yaml", "--run-dir", "run",
             "train.steps=2", "train.batch_size=8", *TOY)
    assert r.returncode == 0, r.stderr[-3000:]
    from ualm_jax.config import load_config

    run_cfg = load_config(elsewhere / "run" / "config.yaml")
    assert run_cfg.data.tokenizer.endswith("tokenizer.json")
    assert run_cfg.data.mixture[0]["path"].startswith(str(clone / "runs" / "demo" / "data"))
    r = ualm(clone, "mixture", "inspect", "--config", "configs/demo.yaml", "--batches", "2",
             "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tasks"], r.stderr[-2000:]
    r = ualm(clone, "mixture", "eval", "--config", "configs/demo.yaml", "--checkpoint",
             "runs/demo", "--batches", "1")
    assert r.returncode == 0 and "held-out" in r.stdout, r.stderr[-2000:]
    # Generation from the run trained on built data: no --tokenizer / --codec needed.
    r = ualm(elsewhere, "generate", "--checkpoint", "run", "--task", "text-to-audio", "--prompt",
             "a high tone then a noise burst", "--out", "x.wav", "--max-new", "30",
             "--max-audio-frames", "10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "x.wav").is_file() and (elsewhere / "x.json").is_file()
    r = ualm(clone, "export", "runs/demo", "--format", "hf-text", "--out", "exports/text")
    assert r.returncode == 0, r.stderr[-2000:]
    r = ualm(clone, "inspect", "exports/text")
    assert r.returncode == 0 and r.stdout, r.stderr[-2000:]
