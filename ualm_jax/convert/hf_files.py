"""Reading a local Hugging Face checkpoint directory tensor by tensor.

config.json + model.safetensors, or + model.safetensors.index.json with several shards. Tensors are
read one at a time (bf16 included, exactly), so peak memory stays near one copy of the model.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _unreadable(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file (truncated, empty or not "
                      f"safetensors): {e}")


class HFTensors(Mapping):
    """Lazy name -> numpy mapping over the safetensors files of one HF directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(f, str) for f in weight_map.values()):
                    raise ValueError("'weight_map' is not an object of tensor -> file name")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a safetensors index (needs 'weight_map'): {e}") from e
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                names = [n for n, f in weight_map.items() if f == missing[0]][:3]
                raise FileNotFoundError(f"missing shard {self.directory / missing[0]} (holds e.g. "
                                        f"{', '.join(names)}); {len(missing)} shard(s) missing")
            self.weight_map = dict(weight_map)
        elif single.exists():
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(single), framework="np") as f:
                    self.weight_map = {k: "model.safetensors" for k in f.keys()}
            except SafetensorError as e:
                raise _unreadable(single, e) from e
        else:
            raise FileNotFoundError(f"{self.directory} has neither model.safetensors nor "
                                    "model.safetensors.index.json")

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"missing tensor {name} in {self.directory}")
        from safetensors import SafetensorError, safe_open

        path = self.directory / self.weight_map[name]
        # The flax backend reads bfloat16 too; numpy has no bf16 of its own (ml_dtypes gives it).
        try:
            with safe_open(str(path), framework="flax") as f:
                x = np.asarray(f.get_tensor(name))
        except SafetensorError as e:
            raise _unreadable(path, e) from e
        if str(x.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"tensor {name} in {path.name} has dtype {x.dtype}; expected one of "
                             f"{', '.join(FLOAT_DTYPES)}")
        return x

    def __iter__(self):
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (an HF checkpoint directory needs config.json)")
    try:
        conf = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(conf, dict):
        raise ValueError(f"{path} holds a JSON {type(conf).__name__}, expected an object of fields")
    return conf
