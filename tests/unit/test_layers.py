"""The import graph runs one way: config -> format -> model/sharding -> data -> train/build ->
infer -> eval -> recipes/demo/tools -> cli. Every import counts, function-local ones included,
and no two modules import each other, directly or round a longer circle."""
import ast
import sys
from pathlib import Path

from paths import REPO

# Bottom to top; a module may import its own layer or any lower one. The longest matching prefix
# decides a module's layer.
LAYERS = [
    ("base", ["ualm_jax", "ualm_jax.storage", "ualm_jax.sigterm"]),
    ("config", ["ualm_jax.config", "ualm_jax.topology"]),
    ("format", ["ualm_jax.format"]),
    ("model", ["ualm_jax.model", "ualm_jax.sharding", "ualm_jax.distributed"]),
    ("data", ["data_pipelines"]),
    ("train", ["ualm_jax.train", "ualm_jax.checkpoint", "ualm_jax.convert"]),
    ("infer", ["ualm_jax.infer"]),
    ("eval", ["ualm_jax.eval"]),
    ("tools", ["ualm_jax.recipes", "ualm_jax.demo", "ualm_jax.report", "ualm_jax.tools",
               "ualm_jax.api"]),
    ("cli", ["ualm_jax.cli"]),
]
PACKAGES = ("ualm_jax", "data_pipelines")
# The package's front door may hand out the top-level Python API (imported on first use).
ALLOWED_UP = {("ualm_jax", "ualm_jax.api")}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return rank


def _imports(path: Path, modules: dict, top_level_only: bool):
    """(line, imported project module) for each import in the file."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                yield node.lineno, name
                break


def test_every_import_points_down():
    modules = _modules()
    wrong = []
    for name, path in sorted(modules.items()):
        mine = _layer(name)
        for line, target in _imports(path, modules, top_level_only=False):
            if target != name and _layer(target) > mine and (name, target) not in ALLOWED_UP:
                wrong.append(f"{path.relative_to(REPO)}:{line} {name} ({LAYERS[mine][0]}) imports "
                             f"{target} ({LAYERS[_layer(target)][0]})")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_no_import_cycle():
    """No circle of imports, function-local ones included (a lazy import still ties the two
    modules together), through package __init__ files too."""
    modules = _modules()
    graph = {name: {t for _, t in _imports(path, modules, top_level_only=False) if t != name}
             for name, path in modules.items()}
    sys.setrecursionlimit(10000)
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layers_test_catches_a_wrong_way_import(tmp_path):
    """The check itself can fail: a model module importing the trainer is reported."""
    modules = {"ualm_jax.model.x": tmp_path / "x.py", "ualm_jax.train.loop": tmp_path / "l.py"}
    modules["ualm_jax.model.x"].write_text("def f():\n    from ualm_jax.train.loop import train\n")
    (line, target), = list(_imports(modules["ualm_jax.model.x"], modules, top_level_only=False))
    assert (line, target) == (2, "ualm_jax.train.loop")
    assert _layer(target) > _layer("ualm_jax.model.x")
