"""TFDS builders that turn manifests into stored records (ualm_jax.format.records).

Use `data_pipelines.build.build(kind, manifest, out_dir, ...)` rather than these classes directly.
"""
from data_pipelines.builders.audio_qa import AudioQABuilder
from data_pipelines.builders.captions import CaptionsBuilder
from data_pipelines.builders.converter import encoder_frames_of_mel
from data_pipelines.builders.manifest import Skip
from data_pipelines.builders.tfds_builder import ManifestBuilder
from data_pipelines.builders.preference import PreferenceBuilder
from ualm_jax.format.records import from_preference_record
from data_pipelines.builders.reason import ReasonBuilder, is_reason_task
from data_pipelines.builders.text_sft import TextSFTBuilder

BUILDERS = {
    "captions": CaptionsBuilder,
    "audio-qa": AudioQABuilder,
    "text-sft": TextSFTBuilder,
    "preference": PreferenceBuilder,
    "reason": ReasonBuilder,
}

__all__ = ["BUILDERS", "ManifestBuilder", "Skip", "encoder_frames_of_mel", "from_preference_record",
           "CaptionsBuilder", "AudioQABuilder", "TextSFTBuilder", "PreferenceBuilder",
           "ReasonBuilder", "is_reason_task"]
