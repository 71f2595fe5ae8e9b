"""UALM-Reason: the three behaviours driven by the "rich caption" plan, as multi-segment records.

Manifest lines (audio paths relative to the manifest; "split"?: "validation" as elsewhere):
  enrichment:      {"behaviour": "enrichment", "prompt": "a vague request",
                    "rich_caption": "keywords: ...; layout: ...; events: ...", "audio": "a.wav"}
      user text -> assistant text (rich caption) <eot> assistant audio <eos>
  dialogue:        {"behaviour": "dialogue", "turns": [{"role": "user"|"assistant", "content": ...}, ...],
                    "rich_caption": "...", "audio": "a.wav"}
      clarifying text turns, then assistant text (rich caption) <eot> assistant audio <eos>
  self-reflection: {"behaviour": "self_reflection", "prompt": "...", "rich_caption": "...",
                    "audio_v1": "v1.wav", "caption_v1": "what v1 sounds like",
                    "critique": "what to change", "audio_v2": "v2.wav"}
      user text -> assistant: rich caption <eot> audio v1 <eot> caption of v1 + critique <eot>
      audio v2 <eos>
Each behaviour accepts its own keys plus "split" and "id"; any other key (e.g. "turns" on an
enrichment line) is refused (unknown_key).
Generated audio stays in context as codec codes. Every record's task is "reason_<behaviour>";
the mixture renders reason tasks with their `<assistant> <modality>` continuation headers
supervised, so the model learns to switch modality inside its own turn.
"""
from __future__ import annotations

from data_pipelines.builders.converter import Converter, check_keys, paths, require_text, strings
from data_pipelines.builders.manifest import COMMON_KEYS, Skip
from data_pipelines.builders.tfds_builder import ManifestBuilder
from ualm_jax.format.records import REASON_TASK_PREFIX, is_reason_task  # noqa: F401 (re-exported)
from ualm_jax.format.template import Segment

BEHAVIOURS = ("enrichment", "dialogue", "self_reflection")
TASK_PREFIX = REASON_TASK_PREFIX
# The keys each behaviour reads: text keys, then audio keys.
TEXT_KEYS = {"enrichment": ("prompt", "rich_caption"),
             "dialogue": ("rich_caption",),
             "self_reflection": ("prompt", "rich_caption", "caption_v1", "critique")}
AUDIO_KEYS = {"enrichment": ("audio",), "dialogue": ("audio",),
              "self_reflection": ("audio_v1", "audio_v2")}
TURN_KEYS = ("role", "content")


def _behaviours(data: dict) -> tuple:
    """The line's behaviour, or every behaviour when it names none known."""
    b = data.get("behaviour")
    return (b,) if isinstance(b, str) and b in BEHAVIOURS else BEHAVIOURS


class ReasonConverter(Converter):
    kind = "reason"
    default_task = "reason"
    needs_codec = True

    @classmethod
    def known_keys(cls, data: dict) -> tuple:
        keys = ["behaviour"]
        for b in _behaviours(data):
            keys += [k for k in TEXT_KEYS[b] + AUDIO_KEYS[b] if k not in keys]
        if "dialogue" in _behaviours(data):
            keys.append("turns")
        return tuple(keys) + COMMON_KEYS

    @classmethod
    def texts(cls, data: dict) -> list:
        behaviours = _behaviours(data)
        if len(behaviours) != 1:  # no known behaviour: the build skips the line
            return []
        b = behaviours[0]
        turns = data.get("turns") if b == "dialogue" else None
        said = [t.get("content") for t in turns if isinstance(t, dict)] \
            if isinstance(turns, list) else []
        return strings(*said, *(data.get(k) for k in TEXT_KEYS[b]))

    @classmethod
    def audio_refs(cls, data: dict) -> list:
        keys = dict.fromkeys(k for b in _behaviours(data) for k in AUDIO_KEYS[b])
        return paths(*(data.get(k) for k in keys))

    def check(self, data: dict) -> None:
        behaviour = data.get("behaviour")
        if behaviour not in BEHAVIOURS:
            raise Skip("behaviour", f"'behaviour' must be one of {', '.join(BEHAVIOURS)}, "
                                    f"got {behaviour!r}")
        require_text(data, "rich_caption", "rich caption")
        if behaviour == "self_reflection":
            for key in ("prompt", "audio_v1", "caption_v1", "critique", "audio_v2"):
                require_text(data, key, key.replace("_", " "))
        else:
            require_text(data, "audio", "audio")
        if behaviour == "enrichment":
            require_text(data, "prompt", "prompt")
        if behaviour == "dialogue":
            turns = data.get("turns")
            if not isinstance(turns, list) or not turns:
                raise Skip("turns", "'turns' must be a non-empty list of {role, content}")
            for i, t in enumerate(turns):
                if isinstance(t, dict):
                    check_keys(t, TURN_KEYS, f" in turns[{i}]")
                if not isinstance(t, dict) or t.get("role") not in ("user", "assistant"):
                    raise Skip("turns", f"turns[{i}].role must be user or assistant")
                require_text(t, "content", f"turns[{i}].content")
            if turns[0]["role"] != "user":
                raise Skip("turns", "the dialogue must start with a user turn")

    def _audio(self, rel: str) -> Segment:
        sr = self.codec.sample_rate
        return Segment("assistant", "audio", self.codes(self.load_wave(rel, sr), sr, rel))

    def records(self, data: dict) -> list:
        b = data["behaviour"]
        text = lambda role, s: Segment(role, "text", self.encode(s.strip()))
        plan = text("assistant", data["rich_caption"])
        if b == "enrichment":
            segs = [text("user", data["prompt"]), plan, self._audio(data["audio"])]
        elif b == "dialogue":
            segs = [text(t["role"], t["content"]) for t in data["turns"]]
            segs += [plan, self._audio(data["audio"])]
        else:
            reflection = data["caption_v1"].strip() + " " + data["critique"].strip()
            segs = [text("user", data["prompt"]), plan, self._audio(data["audio_v1"]),
                    text("assistant", reflection), self._audio(data["audio_v2"])]
        return [self.record(TASK_PREFIX + b, segs)]


class ReasonBuilder(ManifestBuilder, skip_registration=True):
    name = "ualm_reason"
    converter_cls = ReasonConverter
