"""Audio layout: how encoder-input audio maps to clip slots of a packed row. The one owner of the
encoder-frame arithmetic (mel frames -> encoder positions -> slot numbers) that the builders, the
packer, the synthetic stream, inference prompts and the batch contract share.

A clip is one encoder window of `mel_frames` log-mel frames (3000 = 30 s at a 10 ms hop); longer
audio takes several windows, cut by `AudioLayout.windows` (the one rule every producer follows: a
tail too short to give an encoder frame is dropped). The encoder's stride-2 conv gives ceil(n/2)
frames (kernel 3, padding 1), then average pooling by `pool` (floor): 3000 -> 1500 -> 750 with
pool 2 (25 frames/s, AF-Whisper / Audio Flamingo 3's audio-token count). Slot
c * frames_per_window + j is frame j of the row's clip c.
"""
from __future__ import annotations

from dataclasses import dataclass


def encoder_positions(n_mel: int, pool: int) -> int:
    """Encoder positions one window of n_mel valid mel frames gives."""
    return ((int(n_mel) + 1) // 2) // int(pool)


@dataclass(frozen=True)
class AudioLayout:
    """Windows of `mel_frames` log-mel frames, each encoded to `frames_per_window` positions
    (stride-2 conv then average pool); `max_clips` clip slots per packed row."""
    n_mels: int = 0
    mel_frames: int = 0  # window length T_mel (3000 = 30 s)
    frames_per_window: int = 0
    max_clips: int = 0  # F: clip slots per packed row

    def __post_init__(self):
        if self.enabled and self.mel_frames % (2 * self.frames_per_window):
            raise ValueError(f"mel_frames={self.mel_frames} must be a multiple of "
                             f"2 * frames_per_window={2 * self.frames_per_window}")

    @classmethod
    def of_model(cls, model_cfg, max_clips: int) -> "AudioLayout":
        """The layout a model's audio encoder reads (disabled without an encoder)."""
        enc = model_cfg.audio_encoder
        if not enc.enabled:
            return cls()
        return cls(enc.n_mels, enc.max_mel_frames, encoder_positions(enc.max_mel_frames, enc.pool),
                   int(max_clips))

    @property
    def enabled(self) -> bool:
        return min(self.n_mels, self.mel_frames, self.frames_per_window, self.max_clips) > 0

    @property
    def pool(self) -> int:
        return self.mel_frames // 2 // self.frames_per_window

    def window_frames(self, n_mel: int) -> int:
        """Encoder positions one window of n_mel valid mel frames gives."""
        return encoder_positions(n_mel, self.pool)

    def windows(self, mel) -> list:
        """The one windowing rule: mel [n, n_mels] -> its encoder windows, consecutive slices of
        mel_frames frames (the last one shorter), keeping only those that give at least one
        encoder frame (a tail too short to give one is dropped). `mel` may be anything sliced
        along frames: `windows(range(n))` gives the windows of n frames without the mel."""
        t = self.mel_frames
        return [mel[s:s + t] for s in range(0, len(mel), t)
                if self.window_frames(min(t, len(mel) - s))]

    def window_lengths(self, n_mel: int) -> list:
        """Valid mel frames of each encoder window of an n_mel-frame mel (see windows)."""
        return [len(w) for w in self.windows(range(int(n_mel)))]

    def frames_of(self, n_mel: int) -> int:
        """Sequence positions of an encoder segment of n_mel frames, summed over its windows."""
        return sum(self.window_frames(n) for n in self.window_lengths(n_mel))

    def slot(self, clip: int, frame: int) -> int:
        """The audio_slots value of encoder frame `frame` of the row's clip `clip`."""
        return clip * self.frames_per_window + frame
