"""Text-only conversations (reasoning / SFT) -> text records (task "text_sft").

Manifest: JSON lines `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
"split"?: "validation", "id"?: ...}` (other keys: unknown_key). Every message needs non-empty
text; assistant turns carry the loss. Lines name no audio, so eval_fraction splits by line.
Consecutive messages of one role are kept as they are (the template closes them with <eot>).
"""
from __future__ import annotations

from data_pipelines.builders.audio_qa import check_messages, message_texts
from data_pipelines.builders.converter import Converter
from data_pipelines.builders.tfds_builder import ManifestBuilder
from ualm_jax.format.template import Segment


class TextSFTConverter(Converter):
    kind = "text-sft"
    default_task = "text_sft"
    keys = ("messages",)
    names_audio = False

    @classmethod
    def texts(cls, data: dict) -> list:
        return message_texts(data)

    def check(self, data: dict) -> None:
        check_messages(data, allow_audio=False)

    def records(self, data: dict) -> list:
        segments = [Segment(m["role"], "text", self.encode(m["content"].strip()))
                    for m in data["messages"]]
        return [self.record(self.task, segments)]


class TextSFTBuilder(ManifestBuilder, skip_registration=True):
    name = "ualm_text_sft"
    converter_cls = TextSFTConverter
