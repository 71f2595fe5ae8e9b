"""Text tokenizer: a Qwen2 byte-level BPE read from a local `tokenizer.json` (no network).

Ids returned here are the tokenizer's own (unshifted); `JointVocab.text_to_joint` shifts them.
`train_tiny_bpe` builds a small tokenizer with Qwen2's pre-tokenisation for tests, the demo and
`ualm data tokenizer` (on the text of one's own manifests: builders.contents.manifest_texts).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split (from its tokenizer.json): contractions, letters, single digits,
# punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # the byte alphabet and ENDOFTEXT: a smaller vocab_size gives this many


class TextTokenizer:
    """encode(str) -> ids, decode(ids) -> str over a HF `tokenizers` tokenizer.json."""

    def __init__(self, path: str):
        """path: a tokenizer.json file, or a directory holding one (e.g. a Qwen2.5 checkpoint)."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.path = file
        self._tok = Tokenizer.from_file(file)

    def encode(self, text: str) -> list:
        # Qwen2 adds no BOS/EOS of its own; the template adds UALM's special tokens.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included; must not exceed the model's text_vocab_size
        (Qwen2.5 pads its embedding beyond the tokenizer: 151665 used of 151936/152064 rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)


def train_tiny_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> str:
    """Train a byte-level BPE shaped like Qwen2's (NFC, regex split, byte-level) offline.

    Returns the path of the saved tokenizer.json. Deterministic for the same texts.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return path
