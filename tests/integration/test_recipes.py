"""The post-training recipes (UALM-Reason: SFT, SFT, DPO; UALM-Gen: adaptation SFT, DPO) load,
validate, and chain: each stage starts from the previous one's run."""
from pathlib import Path

import pytest

from data_pipelines.mixture import parse_mixture
from ualm_jax.config import load_config
from paths import REPO  # noqa: E402

CONFIGS = REPO / "configs"
RECIPES = {  # name -> (objective, data.source, preset)
    "reason_sft1": ("lm", "mixture", "7b"),
    "reason_sft2": ("lm", "mixture", "7b"),
    "reason_dpo": ("dpo", "preference", "7b"),
    "gen_adapt_sft": ("lm", "mixture", "1.5b"),
    "gen_dpo": ("dpo", "preference", "1.5b"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_validates(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    objective, source, preset = RECIPES[name]
    assert (cfg.train.mode, cfg.data.source, cfg.model.preset) == (objective, source, preset)
    assert cfg.train.init_from, "post-training always starts from a trained run"
    assert cfg.data.tokenizer and cfg.data.codec  # generation / eval read them from the run
    if source == "mixture":
        assert all(e.path for e in parse_mixture(cfg.data.mixture))
    else:
        assert cfg.train.batch_size % 2 == 0 and cfg.dpo.ce_weight > 0


def test_recipes_chain():
    init = {n: load_config(CONFIGS / f"{n}.yaml").train.init_from for n in RECIPES}
    assert init["gen_dpo"].endswith("gen_adapt_sft")
    assert init["reason_dpo"].endswith("reason_sft2")
    assert init["reason_sft2"].endswith("reason_dpo1")  # round 1's DPO run (reason_dpo overrides)
    lrs = {n: load_config(CONFIGS / f"{n}.yaml").optim.learning_rate for n in RECIPES}
    assert lrs["gen_dpo"] < lrs["gen_adapt_sft"] and lrs["reason_dpo"] < lrs["reason_sft2"]
