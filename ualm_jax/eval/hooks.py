"""Hooks the train loop runs after each held-out eval (train/loop.py takes them; `ualm train`
hands them in): generation metrics on the live parameters."""
from __future__ import annotations

from pathlib import Path

import jax

from ualm_jax.config import Config
from ualm_jax.train.metrics import AUDIO_KEY
from ualm_jax.eval.cli_eval import generation_eval, make_clap, make_fd_embedder
from ualm_jax.infer.prompts import read_prompts
from ualm_jax.infer.tasks import from_params, set_params


def eval_hooks(cfg: Config) -> list:
    """The hooks a config asks for (eval.prompts -> generation metrics)."""
    return [GenerationHook(cfg)] if cfg.eval.prompts else []


class GenerationHook:
    """eval.prompts set: generation metrics (CLAP, FD, world match; each names its model) on
    the live parameters at every eval, logged as gen/* next to the held-out losses."""

    def __init__(self, cfg: Config):
        self.cfg, self.loaded = cfg, None
        self.enabled = bool(cfg.eval.prompts)
        if self.enabled and jax.process_count() > 1:  # generation runs on one host's copy
            print("eval.prompts: generation metrics are computed by `ualm eval` on multi-host "
                  "runs, not in the loop", flush=True)
            self.enabled = False
        if self.enabled:
            self.prompts = read_prompts(cfg.eval.prompts)  # a bad file fails before training
            self.clap = make_clap(cfg.eval.clap or None)
            self.fd = make_fd_embedder(cfg.eval.fd_model or None)

    def __call__(self, params, step: int) -> dict:
        if not self.enabled:
            return {}
        host = jax.device_get(params)
        if self.loaded is None:
            self.loaded = from_params(self.cfg, host)
        set_params(self.loaded, host)
        e = self.cfg.eval
        ev = generation_eval(self.loaded, self.prompts, Path(e.prompts).resolve().parent,
                             self.clap, self.fd, e.cfg_scale, e.max_prompts, self.cfg.seed)
        rec = {f"eval/{k}": float(r.value) for k, r in ev.results.items()}
        rec["eval/gen_models"] = {k: r.model for k, r in ev.results.items()}
        rec[AUDIO_KEY] = {"sample_rate": ev.sample_rate, "clips": ev.samples}
        print("eval step {} generation: {}".format(step, " ".join(
            f"{k}={r.value:.4f} ({r.model})" for k, r in ev.results.items())), flush=True)
        return rec
