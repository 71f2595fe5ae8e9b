"""What a config resolves to, without allocating anything: parameter counts (total, trained in
the config's stage, by top-level part) and the batch contract's spec (`ualm config show`)."""
from __future__ import annotations

import jax
import numpy as np

from ualm_jax.config import Config
from ualm_jax.format.batch import batch_spec
from ualm_jax.model.params import abstract_params, build_model
from ualm_jax.train import freeze


def describe_config(cfg: Config) -> dict:
    shapes, _ = abstract_params(build_model(cfg.model))
    by_part = {part: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
               for part, tree in shapes.items()}
    spec = freeze.trainable_spec(shapes, cfg.model, cfg.train)
    return {"parameters": {"total": sum(by_part.values()),
                           "trainable": int(freeze.count_trainable(spec, shapes)),
                           "by_part": by_part},
            "batch_spec": {k: [list(s.shape), str(np.dtype(s.dtype))]
                           for k, s in batch_spec(cfg).items()}}
