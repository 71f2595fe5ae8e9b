"""Preference pairs -> DPO batches: B chosen rows then B rejected rows, one conversation per row
(no packing: a pair's two sides must stay comparable), padded to the sequence length.

Order is a seeded permutation per epoch, so the state is one integer (the next pair index) and a
resumed run sees the same pairs. Pairs longer than the sequence length are skipped and counted.
"""
from __future__ import annotations

import math

import numpy as np

from ualm_jax.format.records import from_preference_record
from ualm_jax.format.template import render


class PreferenceBatches:
    per_host = False  # global batches: the trainer slices this process's rows

    def __init__(self, source, vocab, pairs_per_batch: int, seq_len: int, seed: int = 0,
                 offline_reference: bool = False, text_id0_as_pad: bool = False):
        """pairs_per_batch: global; every process builds the same global batch and the trainer
        places its own rows (train/data.py), so pairs never straddle a layout change.
        text_id0_as_pad: data.text_id0_as_pad (text id 0 -> pad, as the reference)."""
        if len(source) == 0:
            raise ValueError("the preference source holds no pairs")
        self.source, self.vocab = source, vocab
        self.pairs, self.seq_len, self.seed = pairs_per_batch, seq_len, seed
        self.offline = offline_reference
        self.text_id0_as_pad = bool(text_id0_as_pad)
        self.k = max(vocab.num_codebooks, 1)
        self.next = 0  # next pair (in the seeded order)
        self.too_long = 0

    def get_state(self) -> dict:
        return {"next": self.next, "too_long": self.too_long}

    def set_state(self, state: dict) -> None:
        self.next, self.too_long = int(state["next"]), int(state.get("too_long", 0))

    def __iter__(self):
        return self

    def _pair_index(self, i: int) -> int:
        n = len(self.source)
        epoch, j = divmod(i, n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(n)[j])

    def _row(self, segments):
        ex = render(segments, self.vocab, text_id0_as_pad=self.text_id0_as_pad)
        if len(ex) > self.seq_len:
            return None
        tokens = np.zeros((self.seq_len, self.k), np.int32)
        weights = np.zeros((self.seq_len, self.k), np.float32)
        tokens[: len(ex)] = ex.tokens
        weights[: len(ex)] = ex.loss_weights
        seg = np.zeros(self.seq_len, np.int32)
        seg[: len(ex)] = 1
        pos = np.zeros(self.seq_len, np.int32)
        pos[: len(ex)] = np.arange(len(ex))
        return tokens, weights, seg, pos

    def __next__(self) -> dict:
        rows_c, rows_r, refs = [], [], []
        misses = 0
        while len(rows_c) < self.pairs:
            if misses >= len(self.source):  # never loop forever on data that cannot fit
                raise ValueError(f"no preference pair fits seq_len={self.seq_len}; raise "
                                 "train.seq_len")
            chosen, rejected, ref = from_preference_record(self.source[self._pair_index(self.next)])
            self.next += 1
            c, r = self._row(chosen[1]), self._row(rejected[1])
            if c is None or r is None:
                self.too_long += 1
                misses += 1
                continue
            if self.offline and (ref is None or not all(map(math.isfinite, ref))):
                raise ValueError("dpo.reference=offline but a pair has no stored ref_logp; "
                                 "build the pairs with ref_logp_chosen/ref_logp_rejected")
            rows_c.append(c)
            rows_r.append(r)
            refs.append(ref)
        rows = rows_c + rows_r
        batch = {name: np.stack([r[i] for r in rows])
                 for i, name in enumerate(("tokens", "loss_weights", "segment_ids", "positions"))}
        if self.offline:
            batch["ref_logp"] = np.array([r[0] for r in refs] + [r[1] for r in refs], np.float32)
        return batch
