"""`ualm generate` end to end on a tiny random checkpoint with a tiny BPE and spectral codec:
the plumbing (prompt template, guidance rows, delay revert, codec decode, caption slots)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from ualm_jax.checkpoint import save_params
from ualm_jax.config import load_config
from ualm_jax.model.params import build_model, init_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from data_pipelines.codecs.spectral import SpectralCodec
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe

    root = tmp_path_factory.mktemp("gen")
    texts = ["a high tone then a noise burst", "a low chirp", "two clicks"] * 20
    tok_path = train_tiny_bpe(texts, 300, str(root / "tok"))
    vocab_size = TextTokenizer(tok_path).vocab_size
    sr = 16000
    t = np.arange(sr) / sr
    waves = [np.sin(2 * np.pi * f * t).astype(np.float32) * 0.5 for f in (220, 440, 880)]
    codec = SpectralCodec.fit(waves, sr, K=4, C=32, seed=0)
    codec.save(str(root / "codec"))
    cfg = load_config(None, ["model.preset=tiny", f"model.text_vocab_size={vocab_size}",
                             "model.audio_encoder.max_mel_frames=100",
                             f"data.tokenizer={tok_path}", f"data.codec={root / 'codec'}"])
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    save_params(run / "checkpoints", init_params(build_model(cfg.model), jax.random.key(0)))
    sf.write(root / "in.wav", waves[1], sr)
    return root


def _ualm(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "ualm_jax.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_text_to_audio_and_batch_mode(checkpoint):
    out = checkpoint / "out.wav"
    r = _ualm("generate", "--checkpoint", str(checkpoint / "run"), "--task", "text-to-audio",
              "--prompt", "a high tone", "--cfg", "3.0", "--out", str(out), "--max-new", "40",
              "--max-audio-frames", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    wave, sr = sf.read(out)
    assert sr == 16000 and rec["frames"] >= 1 and len(wave) > 0 and np.isfinite(wave).all()
    prompts = checkpoint / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("a low chirp", "two clicks"))
                       + "\n" + json.dumps({"prompt": "a tone", "out": "sub/named.wav"}))
    r = _ualm("generate", "--checkpoint", str(checkpoint / "run"), "--task", "text-to-audio",
              "--prompts", str(prompts), "--out-dir", str(checkpoint / "batch"), "--max-new", "30",
              "--max-audio-frames", "10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(checkpoint / "batch")) == [
        "sample_0000.json", "sample_0000.wav", "sample_0001.json", "sample_0001.wav", "sub"]
    # a line's out: inside --out-dir; every file has its sidecar
    assert sorted(os.listdir(checkpoint / "batch" / "sub")) == ["named.json", "named.wav"]
    assert not (checkpoint / "sub").exists()
    side = json.loads((checkpoint / "batch" / "sub" / "named.json").read_text())
    assert side["prompt"] == "a tone" and side["seed"] == 0 and side["cfg"] == 3.0
    assert side["step"] == 0 and side["checkpoint"] == str(checkpoint / "run")


def test_answer_and_reason(checkpoint):
    r = _ualm("generate", "--checkpoint", str(checkpoint / "run"), "--task", "answer",
              "--prompt", "what is it?", "--audio", str(checkpoint / "in.wav"), "--max-new", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == 1
    prompts = checkpoint / "questions.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is it?", "audio": "in.wav"}) + "\n"
                       + json.dumps({"prompt": "say hi"}) + "\n")
    r = _ualm("generate", "--checkpoint", str(checkpoint / "run"), "--task", "answer",
              "--prompts", str(prompts), "--max-new", "8")  # audio relative to the prompts file
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()[-2:]]
    assert [x["prompt"] for x in lines] == ["what is it?", "say hi"] and "answer" in lines[0]
    out = checkpoint / "reasoned"
    r = _ualm("generate", "--checkpoint", str(checkpoint / "run"), "--task", "reason",
              "--prompt", "a calm scene", "--out", str(out), "--max-new", "30",
              "--max-audio-frames", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    reply = json.loads((out / "reply.json").read_text())
    assert reply["prompt"] == "a calm scene" and reply["segments"] and reply["step"] == 0
    for seg in reply["segments"]:
        assert set(seg) <= {"text", "audio"} and ("audio" not in seg or os.path.exists(seg["audio"]))


def test_caption_prints_text(checkpoint):
    r = _ualm("generate", "--checkpoint", str(checkpoint / "run"), "--task", "caption",
              "--audio", str(checkpoint / "in.wav"), "--max-new", "12")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == 1  # one caption line (random weights: any text)


def test_missing_tokenizer_is_clear(tmp_path):
    cfg = load_config(None, ["model.preset=tiny"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    save_params(run / "checkpoints", init_params(build_model(cfg.model), jax.random.key(0)))
    r = _ualm("generate", "--checkpoint", str(run), "--task", "caption", "--audio", "x.wav")
    assert r.returncode == 2 and "no tokenizer" in r.stderr


def test_prompt_outputs_stay_inside_the_out_dir(tmp_path):
    from ualm_jax.cli import read_prompt_lines

    prompts = tmp_path / "p" / "prompts.jsonl"
    prompts.parent.mkdir()
    prompts.write_text(json.dumps({"prompt": "a", "out": "x/a.wav"}) + "\n\n"
                       + json.dumps({"prompt": "b"}) + "\n" + json.dumps({"prompt": "c", "out": "./c.wav"}))
    items = read_prompt_lines(str(prompts), str(tmp_path / "gen"), "text-to-audio")
    assert [it["out"] for it in items] == [str(tmp_path / "gen" / "x" / "a.wav"),
                                          str(tmp_path / "gen" / "sample_0001.wav"),
                                          str(tmp_path / "gen" / "c.wav")]
    # No --out-dir: next to the prompts file (not the working directory).
    assert read_prompt_lines(str(prompts), None, "text-to-audio")[0]["out"] == str(prompts.parent / "x" / "a.wav")
    for line, match in [({"prompt": "a", "out": "/tmp/evil.wav"}, r"prompts.jsonl:2: out='/tmp/evil.wav' is absolute"),
                        ({"prompt": "a", "out": "../up.wav"}, r"prompts.jsonl:2: out='../up.wav' leaves"),
                        ({"prompt": "a", "out": "x/../../up.wav"}, r"prompts.jsonl:2: out='x/../../up.wav' leaves"),
                        ({"prompt": "a", "out": ""}, r"prompts.jsonl:2: out='' must be a non-empty"),
                        ({"prompt": "a", "out": "sample_0000.wav"}, r"prompts.jsonl:2: out='sample_0000.wav' is also written by line 1"),
                        ({"out": "a.wav"}, r"prompts.jsonl:2: needs a 'prompt' string")]:
        prompts.write_text(json.dumps({"prompt": "first"}) + "\n" + json.dumps(line))
        with pytest.raises(ValueError, match=match):
            read_prompt_lines(str(prompts), str(tmp_path / "gen"), "text-to-audio")
    prompts.write_text("{not json")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: not a JSON object"):
        read_prompt_lines(str(prompts), None, "text-to-audio")


def test_escaping_prompt_output_is_refused_before_loading(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "out": "../../etc/x.wav"}))
    r = _ualm("generate", "--checkpoint", str(tmp_path / "missing"), "--task", "text-to-audio",
              "--prompts", str(prompts), "--out-dir", str(tmp_path / "gen"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"ualm generate: error: {prompts}:1: out='../../etc/x.wav' leaves {tmp_path / 'gen'} "
        "(the --out-dir, default the prompts file's folder)"]
    assert not (tmp_path / "gen").exists()


def test_python_api(checkpoint):
    import ualm_jax

    m = ualm_jax.load(checkpoint / "run")
    wave = m.generate("a high tone", max_new=30, max_audio_frames=8, seed=1)
    assert wave.dtype == np.float32 and wave.ndim == 1 and m.sample_rate == 16000
    np.testing.assert_array_equal(wave, m.text_to_audio(["a high tone"], max_new=30,
                                                        max_audio_frames=8, seed=1)[0])
    clip, _ = sf.read(checkpoint / "in.wav", dtype="float32")
    assert isinstance(m.caption([clip], max_new=6)[0], str)
    assert isinstance(m.answer(["say hi"], max_new=6)[0], str)
    with pytest.raises(TypeError, match="unknown generation setting"):
        m.generate("x", temprature=0.5)
    with pytest.raises(ValueError, match="task='sing'"):
        m.generate("x", task="sing")


def _processes(n, devices, *args, timeout=240):
    """`ualm ARGS` as n processes joined by jax.distributed on localhost, `devices` CPU devices
    each; -> their outputs."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        if n > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
                       JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "ualm_jax.cli", *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


@pytest.mark.slow
def test_two_processes_generate_what_one_process_does(checkpoint, tmp_path):
    """Every process runs every decode batch (one program over 2 x 2 devices) and writes its own
    prompts' outputs: the same clips as one process with 4 devices, for the same seed (the
    pooled metrics of `ualm eval` are checked through the in-loop hook below)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [
        "a low chirp", "two clicks", "a high tone", "a noise burst", "a tone then a click"]))
    common = ["--checkpoint", str(checkpoint / "run"), "--max-new", "24", "--max-audio-frames",
              "8", "--batch-size", "2", "--cfg", "2.0"]
    printed = {}
    for n, devices in ((1, 4), (2, 2)):
        outs = _processes(n, devices, "generate", "--task", "text-to-audio", "--prompts",
                          str(prompts), "--out-dir", str(tmp_path / f"p{n}"), *common)
        printed[n] = [[json.loads(x)["out"] for x in o.splitlines() if x.startswith("{")]
                      for o in outs]
    # Line i is written (and printed) by process i mod 2.
    assert [[os.path.basename(x) for x in p] for p in printed[2]] == [
        ["sample_0000.wav", "sample_0002.wav", "sample_0004.wav"],
        ["sample_0001.wav", "sample_0003.wav"]]
    for i in range(5):
        a, _ = sf.read(tmp_path / "p1" / f"sample_{i:04d}.wav")
        b, _ = sf.read(tmp_path / "p2" / f"sample_{i:04d}.wav")
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_in_loop_generation_hook_runs_on_two_processes(checkpoint, tmp_path):
    """eval.prompts in a multi-host run: the live sharded parameters decode in place on every
    process and the pooled metrics equal those of one process with the same devices."""
    import yaml

    sr = 16000
    for i, f in enumerate((300, 500)):
        sf.write(tmp_path / f"ref{i}.wav", 0.3 * np.sin(2 * np.pi * f * np.arange(sr) / sr), sr)
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p, "reference": f"ref{i % 2}.wav"}) + "\n"
        for i, p in enumerate(["a low chirp", "two clicks", "a high tone"])))
    run_cfg = yaml.safe_load((checkpoint / "run" / "config.yaml").read_text())
    cfg = {"model": {"preset": "tiny", "text_vocab_size": run_cfg["model"]["text_vocab_size"]},
           "train": {"steps": 2, "batch_size": 8, "seq_len": 64, "eval_every": 2,
                     "eval_batches": 1, "log_every": 1, "tensorboard": False},
           "data": {"tokenizer": run_cfg["data"]["tokenizer"], "codec": run_cfg["data"]["codec"]},
           "eval": {"prompts": str(tmp_path / "prompts.jsonl"), "fd_model": "mel-stats",
                    "cfg_scale": 1.5}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    fd = {}
    for n, devices in ((1, 4), (2, 2)):
        run = tmp_path / f"run{n}"
        _processes(n, devices, "train", "--config", str(tmp_path / "cfg.yaml"), "--run-dir", str(run))
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        fd[n] = [r["eval/gen/fd"] for r in recs if "eval/gen/fd" in r]
    assert len(fd[1]) == 1 and fd[2] == pytest.approx(fd[1], rel=1e-6)
