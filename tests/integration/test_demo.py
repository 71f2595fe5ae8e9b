"""`ualm demo` end to end at a toy size: world -> built data -> mixture training over 8 devices ->
results table, results.json, plots, PyTorch export (the plumbing; the README states the numbers
of the full-size run)."""
import json

import pytest

from ualm_jax.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    run = tmp_path / "demo"
    argv = ["demo", "--run-dir", str(run), "--clips", "12", "--problems", "20", "--eval-items", "2",
            "train.steps=2", "train.eval_batches=1", "train.log_every=1", "train.tensorboard=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("held-out loss and stream-0 token accuracy after 2 steps", "text-to-audio cfg 3",
                 "audio QA", "PyTorch export:", "demo finished"):
        assert text in out, text
    results = json.loads((run / "results.json").read_text())
    assert [m["name"] for m in results["mixture"]] == ["caption", "audio_qa", "t2a", "text_sft"]
    assert {e["cfg_scale"] for e in results["world"]["t2a"]} == {1.0, 1.5, 3.0}
    for name in ("losses.png", "mixture.png", "spectrograms.png"):
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "export" / "ualm_config.json").is_file()
    assert (run / "checkpoints" / "2").is_dir()

    # A rerun finds the data ready and the run finished: it re-evaluates without training.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "demo finished" in out and "step 1/2" not in out
