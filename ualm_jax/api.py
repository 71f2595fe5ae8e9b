"""The Python API: a trained checkpoint as an object.

    import ualm_jax
    m = ualm_jax.load("runs/demo")                    # a run dir or one step dir (+ overrides)
    waves = m.text_to_audio(["a dog barks twice"], cfg_scale=3.0, seed=0)
    print(m.caption(waves), m.sample_rate)
    m.answer(["what is making this sound?"], waves)   # audio QA; waves=None for text only
    m.reason(["a calm scene by the sea"])            # [("text", plan), ("audio", codes), ...]
    m.generate("a dog barks twice")                   # one prompt, any task (task="caption", ...)

Sampling keywords are GenerationConfig's (infer/decode.py): cfg_scale, seed, top_k,
audio_temperature, max_new, max_audio_frames, uncond. The tokenizer and codec come from the run
(a run trained on built data records them) unless given.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ualm_jax.infer import tasks
from ualm_jax.infer.decode import GenerationConfig

TASKS = ("text-to-audio", "caption", "answer", "reason")


class Model:
    def __init__(self, loaded: tasks.Loaded):
        self.loaded = loaded

    @property
    def sample_rate(self) -> int:
        return int(self.loaded.codec.sample_rate) if self.loaded.codec else 16000

    @property
    def config(self):
        return self.loaded.cfg

    def _gen(self, **kw) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown generation setting(s) {unknown}; known: {sorted(names)}")
        return GenerationConfig(**kw)

    def _codec(self):
        if self.loaded.codec is None:
            raise ValueError("no codec to decode audio: pass codec=DIR to ualm_jax.load or set "
                             "data.codec in the run config")
        return self.loaded.codec

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        """Codec codes [T, K] -> a float32 mono waveform at `sample_rate`."""
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        return np.asarray(self._codec().decode(codes), np.float32).reshape(-1)

    def text_to_audio(self, captions: list[str], **gen) -> list[np.ndarray]:
        self._codec()
        return [self.decode_audio(c) for c in tasks.text_to_audio(self.loaded, list(captions),
                                                                    self._gen(**gen))]

    def caption(self, waves: list[np.ndarray], **gen) -> list[str]:
        """Captions of 16 kHz mono clips."""
        return tasks.caption(self.loaded, list(waves), self._gen(**gen))

    def answer(self, questions: list[str], waves: list | None = None, **gen) -> list[str]:
        waves = [None] * len(questions) if waves is None else list(waves)
        return tasks.answer(self.loaded, list(questions), waves, self._gen(**gen))

    def reason(self, prompts: list[str], **gen) -> list[list[tuple]]:
        return tasks.reason(self.loaded, list(prompts), self._gen(**gen))

    def generate(self, prompt, task: str = "text-to-audio", audio: np.ndarray | None = None, **gen):
        """One prompt: a waveform (text-to-audio), a string (caption: `prompt` is the clip;
        answer: the question, with `audio`), or the segment list (reason)."""
        if task == "text-to-audio":
            return self.text_to_audio([prompt], **gen)[0]
        if task == "caption":
            return self.caption([prompt], **gen)[0]
        if task == "answer":
            return self.answer([prompt], [audio], **gen)[0]
        if task == "reason":
            return self.reason([prompt], **gen)[0]
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")


def load(checkpoint, tokenizer: str | None = None, codec: str | None = None,
         overrides=()) -> Model:
    """A checkpoint (run dir or step dir, local or gs://) ready to generate; `overrides` are
    dotted config keys (e.g. ["model.attention=xla"]) that do not change parameter shapes."""
    return Model(tasks.load(checkpoint, tokenizer, codec, overrides=overrides))
