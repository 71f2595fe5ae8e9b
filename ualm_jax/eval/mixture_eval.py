"""`ualm mixture eval`: per-task held-out loss and stream-0 token accuracy of a checkpoint on the
validation splits of a config's mixture, with the same sharded eval step training uses."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from ualm_jax.checkpoint import load_params, resolve
from ualm_jax.config import load_config
from ualm_jax.train import data as data_lib
from ualm_jax.train.evaluation import eval_record, eval_sums
from ualm_jax.train.setup import setup_training


def evaluate_mixture(config: str, checkpoint: str, batches: Optional[int] = None,
                     overrides: Sequence[str] = ()) -> dict:
    """The model comes from the checkpoint's run config, the data from `config` (a run's config
    evaluates on its own mixture; another config asks how it does on other data)."""
    cfg = load_config(config, list(overrides))
    if cfg.data.source not in ("mixture", "seqio"):
        raise ValueError(f"{config}: data.source={cfg.data.source!r}; `mixture eval` needs "
                         "data.source=mixture (or seqio) with data.mixture entries or "
                         "data.seqio.mixture")
    run_config, _, step = resolve(checkpoint)
    if run_config.exists():
        cfg.model = load_config(str(run_config)).model
    batches = batches or cfg.train.eval_batches or 8
    names = data_lib.task_names(cfg)
    setup = setup_training(cfg, names)  # the eval step training runs, on the same batch contract
    params = load_params(checkpoint, setup.params_info["params"], setup.shardings["params"])
    rec = eval_record(eval_sums(setup.eval_fn, params, cfg, setup.mesh, batches), names, step)
    tasks = [{"name": n, "loss": rec.get(f"eval/loss/{n}"), "accuracy": rec.get(f"eval/accuracy/{n}"),
              "targets": rec.get(f"eval/targets/{n}", 0)} for n in names]
    return {"checkpoint": str(checkpoint), "step": step, "config": str(config), "split": "validation",
            "batches": batches, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
            "loss": rec["eval/loss"], "accuracy": rec["eval/accuracy"], "tasks": tasks}


def format_table(result: dict) -> str:
    lines = [f"held-out ({result['split']}) over {result['batches']} batches of "
             f"{result['batch_size']} x {result['seq_len']}, checkpoint step {result['step']}",
             f"{'task':<16} {'loss':>8} {'token acc':>10} {'targets':>9}"]
    for t in result["tasks"]:
        if t["loss"] is None:
            lines.append(f"{t['name']:<16} {'-':>8} {'-':>10} {0:>9}")
        else:
            lines.append(f"{t['name']:<16} {t['loss']:>8.4f} {t['accuracy']:>10.3f} {t['targets']:>9,}")
    lines.append(f"{'all':<16} {result['loss']:>8.4f} {result['accuracy']:>10.3f}")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1)
