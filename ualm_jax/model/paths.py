"""Names of parameters from jax tree paths: the one copy (params tables, freeze globs, row masks,
sharding matches, import checks all name a leaf the same way).

A parameter tree is a nested dict, so its names are 'a/b/c' (dict keys joined by '/'). Other
trees (optimiser state: namedtuples, tuples) name an entry by its attribute or index.
"""
from __future__ import annotations

import jax


def key_name(entry) -> str:
    """One tree-path entry -> its name: a dict key, an attribute name, or a sequence index."""
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def path_tuple(path) -> tuple:
    """A jax tree path -> tuple of entry names, e.g. ('decoder', 'layers', 'kernel')."""
    return tuple(key_name(p) for p in path)


def path_name(path) -> str:
    """A jax tree path -> 'a/b/c'."""
    return "/".join(path_tuple(path))


def named_leaves(tree, is_leaf=None) -> list:
    """[('a/b/c', leaf)] in jax's flattening order."""
    return [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def param_names(params):
    """Tree of 'a/b/c' names, same structure as params."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), params)
