"""Caption pairs -> text-to-audio and captioning records, from one manifest.

Manifest: JSON lines `{"audio": "clips/a.wav", "caption": "a dog barks", "split"?: "validation",
"id"?: ...}`, audio paths relative to the manifest's folder (or absolute / gs://). Any other key is
refused (unknown_key).

Design: each line is decoded once and gives up to TWO records, one per task, so both objectives
read from one build and neither carries the other's heavy field:
  * task "t2a":     user text (text-to-audio prompt + caption ids) -> assistant audio (codec codes
                    [T, K], the codec run once here). No mel.
  * task "caption": user text (captioning prompt), user audio (log-mel, the encoder input)
                    -> assistant text (caption ids). No codes.
The builder config picks the tasks: "both" (default), "t2a" (no mel computed) or "caption" (no
codec needed). Records of one line share the line number in their keys; the mixture tells them
apart by `task`.
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from data_pipelines import features as F
from data_pipelines.builders.converter import Converter, paths, require_text, strings
from data_pipelines.builders.tfds_builder import ManifestBuilder
from ualm_jax.format.template import captioning_segments, text_to_audio_segments

TASK_CHOICES = ("both", "t2a", "caption")


class CaptionsConverter(Converter):
    kind = "captions"
    default_task = "both"
    keys = ("audio", "caption")

    def __init__(self, **kwargs):
        task = kwargs.get("task") or self.default_task
        if task not in TASK_CHOICES:
            raise ValueError(f"captions task must be one of {TASK_CHOICES}, got {task!r}")
        super().__init__(**kwargs)

    @property
    def needs_codec(self) -> bool:
        return self.task in ("both", "t2a")

    @property
    def config_name(self) -> str:
        return self.task

    @classmethod
    def texts(cls, data: dict) -> list:
        return strings(data.get("caption"))

    @classmethod
    def audio_refs(cls, data: dict) -> list:
        return paths(data.get("audio"))

    def check(self, data: dict) -> None:
        require_text(data, "audio", "audio")
        require_text(data, "caption", "caption")

    def records(self, data: dict) -> list:
        rel, caption = data["audio"], data["caption"].strip()
        want_codes = self.task in ("both", "t2a")
        sr = self.codec.sample_rate if want_codes else F.SAMPLE_RATE
        wave = self.load_wave(rel, sr)
        out = []
        if want_codes:
            codes = self.codes(wave, sr, rel)
            out.append(self.record("t2a", text_to_audio_segments(self.encode, caption, codes)))
        if self.task in ("both", "caption"):
            audio, mel = self.user_audio(F.resample(wave, sr, F.SAMPLE_RATE), rel)
            segs = captioning_segments(self.encode, audio.content, caption)
            out.append(self.record("caption", segs, [mel]))
        return out


class CaptionsBuilder(ManifestBuilder, skip_registration=True):
    name = "ualm_captions"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="both", description="t2a and caption records per line"),
        tfds.core.BuilderConfig(name="t2a", description="text-to-audio records only"),
        tfds.core.BuilderConfig(name="caption", description="captioning records only"),
    ]
    converter_cls = CaptionsConverter
