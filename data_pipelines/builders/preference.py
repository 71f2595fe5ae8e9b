"""Preference pairs for DPO on generation -> one record per pair (task "preference").

Manifest: JSON lines
  {"prompt": "a dog barks twice", "chosen": "win.wav", "rejected": "lose.wav",
   "ref_logp_chosen"?: -1234.5, "ref_logp_rejected"?: -1240.1, "split"?: "validation",
   "id"?: ..., "score_chosen"?: 0.9, "score_rejected"?: 0.2}
(the id and scores are what `ualm dpo make-pairs` writes besides; they are not stored). Other keys
are refused (unknown_key).
The prompt is a caption; each side is a text-to-audio conversation (user: text-to-audio prompt +
caption, assistant: codec codes of that side's audio), stored as a whole `to_record` under
"chosen" and "rejected". The optional reference-policy log-probs (computed offline, so the frozen
reference model need not sit in accelerator memory during DPO) come as a pair or not at all;
absent ones are stored as NaN. `ualm_jax.format.records.from_preference_record` reads a record
back.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.converter import (Converter, check_finite, paths, record_features,
                                               require_text, strings)
from data_pipelines.builders.manifest import Skip
from data_pipelines.builders.tfds_builder import ManifestBuilder
from ualm_jax.format.template import text_to_audio_segments

SIDES = ("chosen", "rejected")


class PreferenceConverter(Converter):
    kind = "preference"
    default_task = "preference"
    needs_codec = True
    keys = ("prompt", *SIDES, "ref_logp_chosen", "ref_logp_rejected",
            "score_chosen", "score_rejected")

    @classmethod
    def texts(cls, data: dict) -> list:
        return strings(data.get("prompt"))

    @classmethod
    def audio_refs(cls, data: dict) -> list:
        return paths(*(data.get(side) for side in SIDES))

    def check(self, data: dict) -> None:
        require_text(data, "prompt", "prompt")
        for side in SIDES:
            require_text(data, side, side)
        given = [k for k in ("ref_logp_chosen", "ref_logp_rejected") if data.get(k) is not None]
        if len(given) == 1:
            other = "ref_logp_rejected" if given[0] == "ref_logp_chosen" else "ref_logp_chosen"
            raise Skip("missing_key", f"{given[0]} given without {other}")
        for k in given:
            check_finite(data[k], k)

    def features(self) -> dict:
        rec = record_features(self.code_columns, self.n_mels)
        return {"task": tfds.features.Text(),
                **{side: tfds.features.FeaturesDict(dict(rec)) for side in SIDES},
                "ref_logp_chosen": tfds.features.Scalar(dtype=np.float64),
                "ref_logp_rejected": tfds.features.Scalar(dtype=np.float64)}

    def records(self, data: dict) -> list:
        prompt = data["prompt"].strip()
        sr = self.codec.sample_rate
        example, tokens = {"task": self.task}, 0
        for side in SIDES:
            rel = data[side]
            codes = self.codes(self.load_wave(rel, sr), sr, rel)
            _, rec, n = self.record("t2a", text_to_audio_segments(self.encode, prompt, codes))
            example[side] = rec
            tokens += n
        for k in ("ref_logp_chosen", "ref_logp_rejected"):
            example[k] = float(data[k]) if data.get(k) is not None else math.nan
        return [(self.task, example, tokens)]


class PreferenceBuilder(ManifestBuilder, skip_registration=True):
    name = "ualm_preference"
    converter_cls = PreferenceConverter
