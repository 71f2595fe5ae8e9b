"""Hooks the train loop runs after each held-out eval (train/loop.py takes them; `ualm train`
hands them in): generation metrics on the live parameters."""
from __future__ import annotations

from pathlib import Path

from ualm_jax.config import Config
from ualm_jax.train.metrics import AUDIO_KEY
from ualm_jax.eval.generation import generation_eval, make_clap, make_fd_embedder
from ualm_jax.infer.prompts import read_prompts
from ualm_jax.infer.tasks import from_params, inference_mesh, set_params


def eval_hooks(cfg: Config) -> list:
    """The hooks a config asks for (eval.prompts -> generation metrics)."""
    return [GenerationHook(cfg)] if cfg.eval.prompts else []


class GenerationHook:
    """eval.prompts set: generation metrics (CLAP, FD, world match; each names its model) on
    the live parameters at every eval, logged as gen/* next to the held-out losses."""

    def __init__(self, cfg: Config):
        self.cfg, self.loaded = cfg, None
        self.enabled = bool(cfg.eval.prompts)
        if self.enabled:
            self.prompts = read_prompts(cfg.eval.prompts)  # a bad file fails before training
            self.clap = make_clap(cfg.eval.clap or None)
            self.fd = make_fd_embedder(cfg.eval.fd_model or None)

    def __call__(self, params, step: int) -> dict:
        if not self.enabled:
            return {}
        # The live, sharded parameters decode in place under the training mesh (every process
        # of a multi-host run takes part; each scores its own prompts, the metrics are pooled).
        if self.loaded is None:
            self.loaded = from_params(self.cfg, params, *inference_mesh(self.cfg))
        set_params(self.loaded, params)
        e = self.cfg.eval
        ev = generation_eval(self.loaded, self.prompts, Path(e.prompts).resolve().parent,
                             self.clap, self.fd, e.cfg_scale, e.max_prompts, self.cfg.seed)
        rec = {f"eval/{k}": float(r.value) for k, r in ev.results.items()}
        rec["eval/gen_models"] = {k: r.model for k, r in ev.results.items()}
        rec[AUDIO_KEY] = {"sample_rate": ev.sample_rate, "clips": ev.samples}
        print("eval step {} generation: {}".format(step, " ".join(
            f"{k}={r.value:.4f} ({r.model})" for k, r in ev.results.items())), flush=True)
        return rec
