"""UALM-Reason records: enrichment, dialogue and self-reflection in the multi-segment template."""
import json

import numpy as np
import pytest
import soundfile as sf

from data_pipelines.build import build

from data_pipelines.sources import open_source
from ualm_jax.format.records import from_record
from ualm_jax.format.template import render
from ualm_jax.format import vocab as V
from ualm_jax.format.vocab import JointVocab


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_pipelines.codecs.spectral import SpectralCodec
    from data_pipelines.tokenizer import train_tiny_bpe

    root = tmp_path_factory.mktemp("reason")
    sr = 16000
    t = np.arange(sr // 2) / sr
    for name, f in (("a.wav", 330), ("b.wav", 660)):
        sf.write(root / name, (0.4 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr)
    texts = ["make something calm", "keywords: tone; layout: 0-0.5 s; events: a tone",
             "which pitch?", "high please", "too low, raise the pitch", "sounds like a low tone"]
    tok = train_tiny_bpe(texts * 10, 280, str(root / "tok"))
    codec = SpectralCodec.fit([sf.read(root / "a.wav")[0], sf.read(root / "b.wav")[0]], sr, K=3, C=8)
    codec.save(str(root / "codec"))
    lines = [
        {"behaviour": "enrichment", "prompt": "make something calm", "rich_caption": texts[1], "audio": "a.wav"},
        {"behaviour": "dialogue", "turns": [{"role": "user", "content": "make something calm"},
                                            {"role": "assistant", "content": "which pitch?"},
                                            {"role": "user", "content": "high please"}],
         "rich_caption": texts[1], "audio": "b.wav"},
        {"behaviour": "self_reflection", "prompt": "make something calm", "rich_caption": texts[1],
         "audio_v1": "a.wav", "caption_v1": "sounds like a low tone", "critique": texts[4],
         "audio_v2": "b.wav"},
        {"behaviour": "brainstorm", "prompt": "x", "rich_caption": "y", "audio": "a.wav"},
        {"behaviour": "enrichment", "prompt": "x", "rich_caption": "y", "audio": "missing.wav"},
    ]
    (root / "reason.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = build("reason", str(root / "reason.jsonl"), str(root / "out"), codec=str(root / "codec"),
                   tokenizer=tok)
    return root, report


def test_reason_records_follow_the_template(world):
    root, report = world
    assert report["written"] == 3 and report["skipped"] == 2
    skipped = {e["line"]: e["reason"] for e in report["skipped_lines"]}
    assert "behaviour" in skipped[4] and "missing.wav" in skipped[5]
    src = open_source(str(root / "out"))
    by_task = {}
    for i in range(len(src)):
        task, segs, _ = from_record(src[i])
        by_task[task] = segs
    assert sorted(by_task) == ["reason_dialogue", "reason_enrichment", "reason_self_reflection"]
    shape = lambda segs: [(s.role, s.modality) for s in segs]
    assert shape(by_task["reason_enrichment"]) == [("user", "text"), ("assistant", "text"),
                                                   ("assistant", "audio")]
    assert shape(by_task["reason_self_reflection"]) == [
        ("user", "text"), ("assistant", "text"), ("assistant", "audio"), ("assistant", "text"),
        ("assistant", "audio")]
    assert shape(by_task["reason_dialogue"])[:3] == [("user", "text"), ("assistant", "text"),
                                                     ("user", "text")]
    # Rendered: assistant segments inside one turn are joined by <eot>, the turn ends with <eos>.
    vocab = JointVocab(text_vocab_size=280, num_codebooks=3, codebook_size=8)
    ex = render(by_task["reason_self_reflection"], vocab, supervise_continuation_headers=True)
    s0 = ex.tokens[:, 0]
    assert (s0 == V.EOT).sum() == 3 and s0[-1] == V.EOS
    # The continuation headers are supervised so the model learns to switch modality itself.
    header_pos = np.flatnonzero(s0 == V.ASSISTANT)
    assert ex.loss_weights[header_pos[1], 0] > 0 and ex.loss_weights[header_pos[0], 0] == 0


def test_mixture_renderer_supervises_reasoning_headers_only(world):
    """The Grain/SeqIO Renderer trains the modality switch of reason_* records, not of others."""
    from data_pipelines.render import Renderer
    from ualm_jax.format.layout import AudioLayout

    root, _ = world
    src = open_source(str(root / "out"))
    rec = next(src[i] for i in range(len(src)) if src[i]["task"] == "reason_self_reflection")
    vocab = JointVocab(text_vocab_size=280, num_codebooks=3, codebook_size=8)
    renderer = Renderer(vocab, AudioLayout())
    for task, supervised in (("reason_self_reflection", True), ("t2a", False)):
        ex = renderer(0, {**rec, "task": task})
        s0 = ex.tokens[:, 0]
        header_pos = np.flatnonzero(s0 == V.ASSISTANT)
        assert (ex.loss_weights[header_pos[1:], 0] > 0).all() == supervised, task
