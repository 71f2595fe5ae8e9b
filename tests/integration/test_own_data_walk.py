"""The README's "Your own data" walk, its exact lines in order, on real audio: espeak-ng speech and
sox tones (numpy tones where those tools are not installed). Then what a user does next: generate
and inspect from other directories, also after moving the workspace (run dir and builds
together); no clip held out of one task is trained in another; a resume with another global
batch is refused without touching the run's records, and `--reset-data-state` continues it."""
import json
import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from paths import REPO
from ualm_jax.cli import main

SR = 16000
SENTENCES = ["hello there", "the cat sat on the mat", "good morning", "open the door",
             "it is raining", "turn left here", "see you soon", "what a day"]
TONES = [(220, "sine"), (440, "sine"), (880, "square"), (330, "triangle"), (660, "sawtooth"),
         (550, "sine"), (275, "square"), (990, "triangle")]


def walk_commands() -> list[list[str]]:
    """The `ualm` lines of the README's "Your own data" shell block, in order."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own data"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("ualm ")]


def _speech(path, text) -> bool:
    if not shutil.which("espeak-ng"):
        return False
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return True


def _tone(path, freq, shape) -> bool:
    if not shutil.which("sox"):
        return False
    subprocess.run(["sox", "-n", "-r", str(SR), "-c", "1", str(path), "synth", "1.2", shape,
                    str(freq), "vol", "0.5"], check=True, capture_output=True)
    return True


def make_workspace(ws):
    """Clips and three manifests, as a user would bring them."""
    clips = ws / "clips"
    clips.mkdir(parents=True)
    t = np.arange(int(1.2 * SR)) / SR
    captions, qa = [], []
    for i, text in enumerate(SENTENCES):
        rel = f"clips/speech_{i}.wav"
        if not _speech(ws / rel, text):  # a stand-in: a tone whose pitch the text names
            sf.write(ws / rel, 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t), SR)
        captions.append({"audio": rel, "caption": f"a voice says {text}"})
        qa.append({"messages": [{"role": "user", "content": "What is said?", "audio": rel},
                                {"role": "assistant", "content": text}]})
    for i, (freq, shape) in enumerate(TONES):
        rel = f"clips/tone_{i}.wav"
        if not _tone(ws / rel, freq, shape):
            sf.write(ws / rel, 0.3 * np.sign(np.sin(2 * np.pi * freq * t)) if shape == "square"
                     else 0.3 * np.sin(2 * np.pi * freq * t), SR)
        captions.append({"audio": rel, "caption": f"a {shape} tone at {freq} hertz"})
        qa.append({"messages": [{"role": "user", "content": "Which tone is it?", "audio": rel},
                                {"role": "assistant", "content": f"a {shape} tone"}]})
    chat = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                          {"role": "assistant", "content": str(a + b)}]}
            for a in range(4) for b in range(5)]
    for name, lines in (("captions", captions), ("qa", qa), ("chat", chat)):
        (ws / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # The walk generates a caption of clips/a.wav: the user's own clip of that name.
    shutil.copy(ws / "clips" / "speech_0.wav", ws / "clips" / "a.wav")
    return captions


class Run:
    def __init__(self, capsys, monkeypatch):
        self.capsys, self.monkeypatch = capsys, monkeypatch

    def __call__(self, cwd, *args):
        self.monkeypatch.chdir(cwd)
        self.capsys.readouterr()
        rc = main([str(a) for a in args])
        out = self.capsys.readouterr()
        return rc, out.out, out.err


TOY = {"train": ["train.steps=2", "train.log_every=1", "train.eval_every=0",
                 "train.checkpoint_every=0", "train.tensorboard=false", "train.eval_batches=1"],
       "generate": ["--max-new", "12"]}


def _lines_by_split(build, manifest) -> dict:
    """{train: audio paths, validation: audio paths} of a build, from its report."""
    report = json.loads((build / "build_report.json").read_text())
    held = set(report["validation_lines"])
    skipped = {e["line"] for e in report["skipped_lines"]}
    out = {"train": set(), "validation": set()}
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if n in skipped:
            continue
        d = json.loads(line)
        audio = [d["audio"]] if "audio" in d else [m["audio"] for m in d.get("messages", [])
                                                   if "audio" in m]
        out["validation" if n in held else "train"].update(audio)
    return out


@pytest.mark.slow
def test_own_data_walk(tmp_path, capsys, monkeypatch):
    ualm = Run(capsys, monkeypatch)
    ws = tmp_path / "ws"
    make_workspace(ws)
    commands = walk_commands()
    assert [c[:2] for c in commands][:2] == [["data", "tokenizer"], ["data", "codec"]]
    assert len(commands) <= 10
    for argv in commands:
        argv = argv + TOY.get(argv[0], [])
        rc, out, err = ualm(ws, *argv)
        assert rc == 0, f"ualm {' '.join(argv)}\n{err[-3000:]}"
        if argv[0] == "generate":
            assert out.strip(), "no caption printed"
    run = ws / "runs" / "my1"
    assert (run / "checkpoints" / "2").is_dir()
    assert (ws / "exports" / "my1" / "ualm_config.json").is_file()
    cfg_text = (run / "config.yaml").read_text()
    assert "../../data/t2a" in cfg_text and str(ws) not in cfg_text  # nothing absolute

    # No clip is held out of one task and trained in another.
    builds = {"caption": "captions", "t2a": "captions", "audio_qa": "qa"}
    splits = {b: _lines_by_split(ws / "data" / b, ws / f"{m}.jsonl") for b, m in builds.items()}
    held = set().union(*(s["validation"] for s in splits.values()))
    trained = set().union(*(s["train"] for s in splits.values()))
    assert held and trained and not held & trained, held & trained

    # From another directory: the run reads its data, tokenizer and codec from its config.yaml.
    other = tmp_path / "other"
    other.mkdir()
    rc, out, err = ualm(other, "generate", "--checkpoint", "../ws/runs/my1", "--task",
                        "text-to-audio", "--prompt", "a sine tone at 440 hertz", "--out", "t.wav",
                        "--max-new", "12", "--max-audio-frames", "8")
    assert rc == 0 and (other / "t.wav").is_file(), err[-3000:]
    # Move the workspace (run dir and builds together): still generates and inspects.
    moved = tmp_path / "moved"
    shutil.move(str(ws), str(moved))
    rc, out, err = ualm(other, "generate", "--checkpoint", "../moved/runs/my1", "--task",
                        "caption", "--audio", "../moved/clips/tone_1.wav", "--max-new", "12")
    assert rc == 0 and out.strip(), err[-3000:]
    rc, out, err = ualm(other, "mixture", "inspect", "--resume-from", "../moved/runs/my1",
                        "--batches", "1")
    assert rc == 0 and "consumed" in out, err[-3000:]
    (other / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"a sine tone at {f} hertz", "reference": f"../moved/clips/tone_{i}.wav"})
        + "\n" for i, f in ((0, 220), (1, 440))))
    rc, out, err = ualm(other, "eval", "--checkpoint", "../moved/runs/my1", "--prompts",
                        "prompts.jsonl", "--fd-model", "mel-stats", "--max-new", "12",
                        "--max-audio-frames", "8")
    assert rc == 0 and "gen/fd" in out, err[-3000:]

    # Another global batch: refused, naming the ways out, with the run's records untouched.
    run = moved / "runs" / "my1"
    before = (run / "config.yaml").read_bytes()
    args = ["train", "--config", "own_data", "--run-dir", "runs/my1", *TOY["train"],
            "train.steps=3", "train.batch_size=16"]
    rc, out, err = ualm(moved, *args)
    assert rc == 2 and "--reset-data-state" in err, err[-3000:]
    assert (run / "config.yaml").read_bytes() == before
    assert not (run / "config_history").exists()
    rc, out, err = ualm(moved, *args, "--reset-data-state")
    assert rc == 0 and (run / "checkpoints" / "3").is_dir(), err[-3000:]
    assert "the data stream starts afresh" in out
    assert "train.batch_size: 8 -> 16" in out  # the change is on record
