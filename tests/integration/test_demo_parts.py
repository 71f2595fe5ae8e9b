"""The demo's parts on a small world: data preparation (and its stamp), reply prompts that equal
the training rendering, the world evaluation end to end on a random tiny model, and the plots."""
import json
import os
import time

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
sf = pytest.importorskip("soundfile")

from data_pipelines.demo import data as demo_data  # noqa: E402
from data_pipelines.demo.data import prepare_world_data  # noqa: E402

N_CLIPS = 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "data")
    t = time.perf_counter()
    info = prepare_world_data(out, n_clips=N_CLIPS, vocab_size=400)
    print(f"\nprepare_world_data({N_CLIPS} clips): {time.perf_counter() - t:.1f} s")
    return out, info


@pytest.fixture(scope="module")
def model(data):
    """A random tiny model over the prepared tokenizer and codec (max_mel_frames 64: a 2 s clip
    takes four encoder windows, the last one short)."""
    from data_pipelines.codecs import load_codec
    from data_pipelines.tokenizer import TextTokenizer
    from ualm_jax.config import load_config
    from ualm_jax.infer.tasks import Loaded
    from ualm_jax.model.params import build_model, init_params
    from ualm_jax.format.vocab import JointVocab

    _, info = data
    vocab = info["text_vocab_size"]
    cfg = load_config(None, ["model.preset=tiny", f"model.text_vocab_size={vocab}"])
    params = init_params(build_model(cfg.model), jax.random.key(0))
    return Loaded(cfg, params, JointVocab.from_model_config(cfg.model),
                  TextTokenizer(info["tokenizer"]), load_codec(info["codec"]))


# Data ---------------------------------------------------------------------------------------------
def test_prepared_datasets_open_and_count(data):
    from data_pipelines.sources import open_source

    out, info = data
    assert set(info["datasets"]) == set(demo_data.DATASETS)
    assert info["codec_k"] == 4 and info["codec_c"] == 32 and 0 < info["text_vocab_size"] <= 400
    tasks = {}
    for name, folder in info["datasets"].items():
        counts = info["counts"][name]
        assert counts["train"] > 0 and counts["validation"] > 0, (name, counts)
        for split, n in counts.items():
            src = open_source(folder, split)
            assert len(src) == n
        tasks[name] = {open_source(folder)[i]["task"] for i in range(counts["train"])}
    # One task per dataset: the mixture entry is what tells t2a from captioning.
    assert tasks["t2a"] == tasks["rich_t2a"] == {"t2a"} and tasks["caption"] == {"caption"}
    assert tasks["reason"] == {"reason_enrichment"} and tasks["audio_qa"] == {"audio_qa"}
    assert info["counts"]["audio_qa"]["train"] == 3 * info["counts"]["caption"]["train"]


def test_stamp_skips_same_arguments_and_rebuilds_others(data, tmp_path, monkeypatch):
    out, info = data
    stamp = os.path.join(out, demo_data.STAMP)
    before = os.stat(stamp).st_mtime_ns
    t = time.perf_counter()
    again = prepare_world_data(out, n_clips=N_CLIPS, vocab_size=400)
    assert time.perf_counter() - t < 1.0 and again == info
    assert os.stat(stamp).st_mtime_ns == before
    # The decision alone, without the work: count the builds.
    calls = []

    def fake(out_dir, args):
        calls.append(args)
        return {"tokenizer": "t.json", "codec": "codec", "world": "world", "datasets": {},
                "counts": {}, "text_vocab_size": 1, "codec_k": 4, "codec_c": 32, "args": args}

    monkeypatch.setattr(demo_data, "_prepare", fake)
    d = str(tmp_path / "d")
    os.makedirs(d)
    prepare_world_data(d, n_clips=5)
    prepare_world_data(d, n_clips=5)
    assert len(calls) == 1
    r = prepare_world_data(d, n_clips=5, seed=1)
    assert len(calls) == 2 and calls[-1]["seed"] == 1 and r["world"] == os.path.join(d, "world")


# Reply prompts ------------------------------------------------------------------------------------
def _training_rows(info, name, split="validation"):
    from data_pipelines.sources import open_source

    src = open_source(info["datasets"][name], split)
    return [src[i] for i in range(len(src))]


def _clip_of_mel(info, mel):
    """The world clip whose stored (builder) mel this is."""
    from data_pipelines.features import window_log_mels
    from data_pipelines.demo.world import load_world

    world_dir = info["world"]
    for c in load_world(world_dir)["clips"]:
        wave = sf.read(os.path.join(world_dir, c["audio"]), dtype="float32")[0]
        mels, mask = window_log_mels(wave, mel.shape[1])
        if np.array_equal(mels[mask].astype(np.float16), mel):
            return wave
    raise AssertionError("no world clip gives this record's mel")


def _check_prompt_is_row_minus_answer(model, rec, text, wave):
    """reply_prompts(text, wave) must be the trainer's rendering of `rec` cut right before the
    answer: same ids, the answer (then <eos>) is all that follows, and every encoder window sits
    at the same positions with the same features."""
    from data_pipelines.render import Renderer
    from ualm_jax.format.layout import AudioLayout
    from ualm_jax.format.records import from_record
    from ualm_jax.infer.tasks import reply_prompts
    from ualm_jax.format import vocab as V

    enc = model.cfg.model.audio_encoder
    layout = AudioLayout.of_model(model.cfg.model, 8)
    row = Renderer(model.vocab, layout)(0, rec)
    prompts, slots, feats = reply_prompts(model, [text], [wave])
    p = prompts[0]
    n = len(p)
    np.testing.assert_array_equal(p, row.tokens[:n])
    answer_ids = from_record(rec)[1][-1].content
    np.testing.assert_array_equal(row.tokens[n:, 0],
                                  [*model.vocab.text_to_joint(answer_ids), V.EOS])
    assert row.loss_weights[:n].sum() == 0 and (row.loss_weights[n:, 0] > 0).all()
    if wave is None:
        assert slots is None and feats is None and not row.clips
        return
    assert len(row.clips) == 4 and len(row.clips[-1][2]) < enc.max_mel_frames  # 200 = 3 * 64 + 8
    for c, (pos, nf, window) in enumerate(row.clips):
        np.testing.assert_array_equal(slots[0, pos:pos + nf],
                                      layout.slot(c, np.arange(nf)))
        np.testing.assert_array_equal(feats[0, c, :len(window)], window.astype(np.float32))
        assert not feats[0, c, len(window):].any()
    assert (slots[0] >= 0).sum() == sum(nf for _, nf, _ in row.clips)


def test_reply_prompts_equal_training_rendering(data, model):
    from ualm_jax.format.records import from_record
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT
    from ualm_jax.infer.decode import GenerationConfig
    from ualm_jax.infer.tasks import caption

    _, info = data
    decode = model.tokenizer.decode
    for rec in _training_rows(info, "audio_qa")[:2]:
        question = decode(from_record(rec)[1][0].content)
        _check_prompt_is_row_minus_answer(model, rec, question, _clip_of_mel(info, rec["mel"]))
    rec = _training_rows(info, "caption")[0]
    wave = _clip_of_mel(info, rec["mel"])
    _check_prompt_is_row_minus_answer(model, rec, AUDIO_TO_CAPTION_PROMPT, wave)
    texts = caption(model, [wave], GenerationConfig(max_new=2))  # the same prompt, generated
    assert len(texts) == 1 and isinstance(texts[0], str)
    rec = _training_rows(info, "text_sft")[0]
    _check_prompt_is_row_minus_answer(model, rec, decode(from_record(rec)[1][0].content), None)


# World evaluation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(data, model, tmp_path_factory):
    from ualm_jax.eval.demo_world import evaluate_world

    _, info = data
    out = str(tmp_path_factory.mktemp("eval"))
    t = time.perf_counter()
    results = evaluate_world(model, info["world"], out, max_items=3, text_max_new=6,
                             audio_frames=12)
    print(f"\nevaluate_world (random tiny model): {time.perf_counter() - t:.1f} s")
    return out, results


def test_evaluate_world_end_to_end(evaluated):
    from ualm_jax.eval.metrics import normalise_answer as normalise
    from ualm_jax.eval.demo_world import format_world_table

    out, r = evaluated
    assert r["caption"]["n"] == 2 and r["audio_qa"]["n"] == 3 and r["text"]["n"] == 2
    values = [r["caption"]["exact"], r["caption"]["score"], r["audio_qa"]["exact"],
              r["text"]["exact"]]
    assert [e["cfg_scale"] for e in r["t2a"]] == [1.0, 3.0]
    for e in r["t2a"]:
        values += [e["match"], e["judge"]]
        assert len(e["samples"]) == 2
        for _, path in e["samples"]:
            wave, sr = sf.read(path)
            assert sr == 16000 and np.isfinite(wave).all()
    assert all(0.0 <= v <= 1.0 for v in values), values
    assert len(r["samples"]) == 4 and r["samples"][-1][0].startswith("cfg 3: ")
    assert json.load(open(os.path.join(out, "world_eval.json")))["text"]["n"] == 2
    table = format_world_table(r)
    print("\n" + table)
    assert "text-to-audio cfg 3" in table and "audio QA" in table
    assert normalise(" The Noise  burst.") == "the noise burst"
    assert normalise("3 ,5, 9.") == "3, 5, 9"


# Plots --------------------------------------------------------------------------------------------
def _is_png(path) -> bool:
    import matplotlib.image

    with open(path, "rb") as f:
        ok = f.read(8) == PNG_MAGIC
    return ok and matplotlib.image.imread(path).shape[0] > 50


def test_plots_write_pngs(evaluated, tmp_path):
    from ualm_jax.report import plot_losses, plot_mixture, plot_spectrograms

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 5.0 / s, "loss/t2a": 6.0 / s, "loss/text_sft": 4.0 / s,
              "loss/stream_0": 1.0, "task_mix": {"t2a": 3}} for s in range(1, 6)]
    lines.append({"step": 5, "eval/loss": 1.2, "eval/loss/t2a": 1.5, "eval/loss/text_sft": 1.0})
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    paths = [plot_losses(str(metrics), str(tmp_path / "run" / "losses.png")),
             plot_mixture({"t2a": 0.5, "text_sft": 0.5}, {"t2a": 0.45, "text_sft": 0.55},
                          str(tmp_path / "mixture.png")),
             plot_spectrograms(evaluated[1]["samples"], str(tmp_path / "spectrograms.png"))]
    assert paths[0] == str(tmp_path / "run" / "losses.png")
    assert all(_is_png(p) for p in paths)
