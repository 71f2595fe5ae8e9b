"""The settings of one generation (decode.py reads them). Standard library only: the CLI's
generation flags take their defaults from these fields, and `ualm --help` must not import JAX."""
from __future__ import annotations

from dataclasses import dataclass

# The unconditional prompt for guidance (infer/tasks.py): ours = pad before `<assistant>`, header
# kept, as CFG dropout trains; reference = pad through `<assistant>`, only `<audio>` kept.
UNCOND = ("ours", "reference")


@dataclass
class GenerationConfig:
    max_new: int = 256  # positions per row
    max_audio_frames: int = 500  # a clip is ended (ramp forced) after this many frames
    text_temperature: float = 0.0  # greedy text
    audio_temperature: float = 0.8
    top_k: int = 20  # audio; text uses top_k only when sampled
    # UALM form: lambda*cond + (1-lambda)*uncond; 1 = no guidance. 3.0 is UALM's text-to-audio
    # setting, so the Python API, `ualm generate`, `ualm eval` and make-pairs agree.
    cfg_scale: float = 3.0
    uncond: str = "ours"  # one of UNCOND
    seed: int = 0
    batch: int = 16  # prompts per decode batch (tasks.in_batches); outputs do not depend on it
