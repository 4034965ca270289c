"""The package's shape, checked from its imports (ast, nothing is run).

Parts: the runner (``runner/``, ``main.py``, ``prepare.py``), merging, models, data, infra
(``sharding``, ``checkpointing``, ``runtime``) and results (``metrics``, ``report``), over
a neutral bottom layer (``tree_util``, ``io``, ``losses``, ``errors``) that imports none
of them. No two parts may import each other, and the task loop names no method.
"""

import ast
import itertools
import os

import pytest

from trm_jax.runner import methods

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trm_jax")
BOTTOM = {"tree_util", "io", "losses", "errors", "__init__"}
PARTS = {
    "runner": {"runner", "main", "prepare"},
    "merging": {"merging"},
    "models": {"models"},
    "data": {"data"},
    "infra": {"sharding", "checkpointing", "runtime"},
    "results": {"metrics", "report"},
}


def _part(module: str) -> str:
    head = module.split(".")[1] if module.startswith("trm_jax.") else module
    if head in BOTTOM:
        return "bottom"
    for part, names in PARTS.items():
        if head in names:
            return part
    raise AssertionError(f"module {module} belongs to no part: add it to PARTS")


def _modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(path: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("trm_jax.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "trm_jax":
                out |= {f"trm_jax.{a.name}" for a in node.names}
            elif node.module.startswith("trm_jax."):
                out.add(node.module)
    return out


def part_graph() -> dict[tuple[str, str], list[str]]:
    """(importer part, imported part) -> the modules that make the arrow."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, path in _modules():
        if module == "trm_jax":
            continue
        src = _part(module)
        for imported in _imports(path):
            dst = _part(imported)
            if dst != src:
                edges.setdefault((src, dst), []).append(f"{module} -> {imported}")
    return edges


def test_no_two_parts_import_each_other():
    edges = part_graph()
    for a, b in itertools.combinations([*PARTS, "bottom"], 2):
        both = (a, b) in edges and (b, a) in edges
        assert not both, f"{a} <-> {b}: {edges.get((a, b))} and {edges.get((b, a))}"


def test_bottom_layer_imports_no_part():
    assert not [e for e in part_graph() if e[0] == "bottom"], part_graph()


def test_merging_never_imports_a_model_or_the_runner():
    edges = part_graph()
    for dst in ("models", "runner", "data"):
        assert ("merging", dst) not in edges, edges.get(("merging", dst))


def test_task_loop_names_no_method():
    loop = os.path.join(PKG, "runner", "loop.py")
    strings = {
        n.value
        for n in ast.walk(ast.parse(open(loop).read()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    named = sorted(strings & set(methods.METHODS))
    assert not named, f"runner/loop.py branches on method names {named}"


@pytest.mark.parametrize("module", ["continual", "train", "baselines_cl"])
def test_old_runner_modules_are_gone(module):
    assert not os.path.exists(os.path.join(PKG, f"{module}.py"))
