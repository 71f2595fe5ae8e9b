"""Audio question answering / dialogue -> understanding records (task "audio_qa").

Manifest: JSON lines
  {"messages": [{"role": "system", "content": "..."},
                {"role": "user", "content": "What is making this sound?", "audio": "a.wav"},
                {"role": "assistant", "content": "A dog."}, ...],
   "split"?: "validation", "id"?: ...}
Other keys, on the line or in a message, are refused (unknown_key).
`audio` (user turns only) is one path or a list of paths, relative to the manifest's folder; a user
turn is its text (may be empty when it has audio) then its audio segments, as the UALM template has
it. Audio is stored as log-mel (the frozen encoder's input), text as tokenizer ids; assistant turns
are text and carry the loss. No codec is needed (one may be given: token counts then use its K, C).
"""
from __future__ import annotations

from data_pipelines import features as F
from data_pipelines.builders.converter import Converter, check_keys, paths, require_text, strings
from data_pipelines.builders.manifest import Skip
from data_pipelines.builders.tfds_builder import ManifestBuilder
from ualm_jax.format.template import Segment

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "audio")


def message_list(data: dict) -> list:
    """The message objects of a line (none when `messages` is not a list)."""
    messages = data.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def message_texts(data: dict) -> list:
    return strings(*(m.get("content") for m in message_list(data)))


def message_audio(data: dict) -> list:
    out = []
    for m in message_list(data):
        audio = m.get("audio")
        out += paths(*(audio if isinstance(audio, list) else [audio]))
    return out


def check_messages(data: dict, allow_audio: bool) -> list:
    """Structure of a `messages` list; raise Skip. Returns the messages."""
    if "messages" not in data:
        raise Skip("missing_key", "missing key 'messages'")
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise Skip("bad_value", "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise Skip("bad_value", f"{where} must be an object")
        check_keys(m, MESSAGE_KEYS, f" in {where}")
        if "role" not in m:
            raise Skip("missing_key", f"missing key 'role' in {where}")
        role = m["role"]
        if role not in ROLES:
            raise Skip("bad_value", f"{where} has unknown role {role!r} (system, user, assistant)")
        audio = m.get("audio")
        if audio is not None and not allow_audio:
            raise Skip("bad_value", f"{where} has audio; this kind holds text only")
        if audio is not None and role != "user":
            raise Skip("bad_value", f"{where}: only user turns may carry audio, not {role}")
        if audio is not None:
            paths = audio if isinstance(audio, list) else [audio]
            if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
                raise Skip("bad_value", f"{where}: 'audio' must be a path or a list of paths")
        what = "answer" if role == "assistant" else f"{role} text"
        require_text(m, "content", f"{what} in {where}", allow_empty=audio is not None)
    if not any(m["role"] == "assistant" for m in messages):
        raise Skip("bad_value", "no assistant message: nothing to learn from")
    return messages


class AudioQAConverter(Converter):
    kind = "audio-qa"
    default_task = "audio_qa"
    keys = ("messages",)

    @classmethod
    def texts(cls, data: dict) -> list:
        return message_texts(data)

    @classmethod
    def audio_refs(cls, data: dict) -> list:
        return message_audio(data)

    def check(self, data: dict) -> None:
        check_messages(data, allow_audio=True)

    def records(self, data: dict) -> list:
        segments, mels = [], []
        for m in data["messages"]:
            text = m.get("content", "").strip()
            if text:
                segments.append(Segment(m["role"], "text", self.encode(text)))
            audio = m.get("audio")
            for rel in (audio if isinstance(audio, list) else [audio] if audio else []):
                seg, mel = self.user_audio(self.load_wave(rel, F.SAMPLE_RATE), rel)
                segments.append(seg)
                mels.append(mel)
        return [self.record(self.task, segments, mels)]


class AudioQABuilder(ManifestBuilder, skip_registration=True):
    name = "ualm_audio_qa"
    converter_cls = AudioQAConverter
