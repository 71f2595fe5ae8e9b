"""`ualm inspect PATH`: the tensor tree of an Orbax checkpoint (with its saved sharding), an HF
directory, or an exported directory, without loading any tensor data."""
from __future__ import annotations

import json

import numpy as np

import ualm_jax.storage as storage


def _rows_orbax(path) -> tuple[str, list[tuple]]:
    from ualm_jax.checkpoint import STATE, item_tree, resolve

    _, ckpts, step = resolve(path)  # checks the step's checksums first
    item = ckpts / str(step) / STATE
    tree = item_tree(ckpts, step)
    rows = []
    for keypath, m in _flatten(tree):
        sharding = getattr(m, "sharding", None)
        spec = getattr(sharding, "partition_spec", None) if sharding is not None else None
        rows.append(("/".join(keypath), tuple(getattr(m, "shape", ())), str(getattr(m, "dtype", "?")),
                     str(tuple(spec)) if spec is not None else "-"))
    return f"orbax checkpoint {item} (step {step})", rows


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, prefix + (str(i),))
    else:
        yield prefix, tree


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def _safetensors_header(file) -> dict:
    """name -> {dtype, shape} from a safetensors file's JSON header (8-byte length, then JSON),
    read without touching tensor data; works on local files and gs:// objects alike."""
    with file.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _rows_safetensors(path) -> tuple[str, list[tuple]]:
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    rows = []
    for fname in files:
        if not (path / fname).exists():
            raise FileNotFoundError(f"missing shard {path / fname} (named by {index.name})")
        for name, h in _safetensors_header(path / fname).items():
            rows.append((name, tuple(h["shape"]), _ST_DTYPES.get(h["dtype"], h["dtype"]), fname))
    kind = "exported UALM directory" if (path / "ualm_config.json").exists() else "HF directory"
    return f"{kind} {path}", sorted(rows)


def inspect(path) -> dict:
    path = storage.as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        title, rows = _rows_safetensors(path)
        last = "file"
    else:
        title, rows = _rows_orbax(path)
        last = "sharding"
    total = int(sum(np.prod(r[1]) for r in rows))
    return {"title": title, "columns": ["name", "shape", "dtype", last], "rows": rows,
            "total": total}


def render(info: dict) -> str:
    rows = [(r[0], "x".join(map(str, r[1])) or "scalar", r[2], r[3]) for r in info["rows"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(info["columns"])]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    out = [info["title"], line(info["columns"]), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append(f"{len(rows)} tensors, {info['total']:,} values")
    return "\n".join(out)


def to_json(info: dict) -> str:
    return json.dumps({"title": info["title"], "total": info["total"], "tensors": [
        {"name": r[0], "shape": list(r[1]), "dtype": r[2], info["columns"][3]: r[3]}
        for r in info["rows"]]})
