"""The layers of docs/ARCHITECTURE.md, enforced by parsing every import of the package.

Each module of sae_fast (kernels/ as sae_fast.kernels) may import only from its own layer or
those below it, and no set of modules imports itself around a circle. Imports inside
functions count, as do importlib.import_module calls with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"sae_fast": REPO / "sae_fast", "sae_fast.kernels": REPO / "kernels"}

# Lowest first; a module belongs to the first entry that names it or a package above it.
# "sae_fast" itself (its __init__) is the public face over everything but the CLI.
LAYERS = [
    ("foundation", ["sae_fast.version", "sae_fast.options", "sae_fast.lazy", "sae_fast.files",
                    "sae_fast.reference", "sae_fast.validation", "sae_fast.sae_config",
                    "sae_fast.parallel.row_shards", "sae_fast.checkpoint", "sae_fast.clt.config"]),
    ("engine", ["sae_fast.backends", "sae_fast.kernels", "sae_fast._C"]),
    ("ops", ["sae_fast.ops", "sae_fast.parallel.ops"]),
    ("formats and sources", ["sae_fast.formats", "sae_fast.sources"]),
    ("module", ["sae_fast.sae", "sae_fast.parallel.sae", "sae_fast.clt",
                "sae_fast.parallel.clt"]),
    ("training", ["sae_fast.training", "sae_fast.parallel"]),
    ("analysis", ["sae_fast.analysis"]),
    ("integrations", ["sae_fast.integrations"]),
    ("apps", ["sae_fast.apps"]),
    ("package", ["sae_fast"]),
    ("cli", ["sae_fast.cli", "sae_fast.__main__"]),
]  # fmt: skip


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = modules()


def layer(module: str) -> int:
    matches = [
        (len(prefix), rank)
        for rank, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return max(matches)[1]


def imports(module: str) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for every import in module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield base, alias.name, node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            yield node.args[0].value, None, node.lineno


def arrows(module: str) -> Iterator[tuple[str, str | None, int]]:
    """(internal module imported, name, line): `from pkg import sub` points at pkg.sub."""
    for target, name, line in imports(module):
        if name is not None and f"{target}.{name}" in MODULES:
            target, name = f"{target}.{name}", None
        if target == "sae_fast" or target.startswith("sae_fast."):
            yield target, name, line


GRAPH = {m: {t for t, _, _ in arrows(m) if t != m} for m in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_runs_up_a_layer():
    upward = [
        f"{MODULES[m].relative_to(REPO)}:{line} imports {t} ({LAYERS[layer(t)][0]}) from the "
        f"{LAYERS[layer(m)][0]} layer"
        for m in MODULES
        for t, _, line in arrows(m)
        if layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v] & MODULES.keys():
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_imports_form_no_circle():
    assert _cycles() == []


def test_kernels_import_only_the_shared_scaffold_of_the_backends():
    for module in MODULES:
        if module.startswith("sae_fast.kernels"):
            reached = {t for t, _, _ in arrows(module) if t.startswith("sae_fast.backends")}
            assert reached <= {"sae_fast.backends.pairs"}, (module, reached)


def test_formats_never_import_the_module():
    for module in MODULES:
        if module.startswith("sae_fast.formats"):
            assert "sae_fast.sae" not in GRAPH[module], module


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{MODULES[m].relative_to(REPO)}:{line} takes {name} from {t}"
        for m in MODULES
        for t, name, line in arrows(m)
        if name is not None and name.startswith("_") and t != m
    ]
    assert not private, "\n".join(private)


def test_every_package_is_installed():
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == set(listed["packages"])


@pytest.mark.parametrize(
    ("module", "target", "expected"),
    [
        ("sae_fast.formats.native", "sae_fast.checkpoint", True),
        ("sae_fast.training.trainer", "sae_fast.training.checkpoints", True),
        ("sae_fast.backends.triton", "sae_fast.kernels.encode_topk", True),
        ("sae_fast.backends.cuda", "sae_fast._C", True),
        ("sae_fast.ops", "sae_fast.backends", True),
        ("sae_fast.formats.native", "sae_fast.formats", False),
    ],
)
def test_the_parser_sees_relative_lazy_and_dynamic_imports(module, target, expected):
    """The checks above rest on the parser: from .. import x, imports inside functions and
    importlib.import_module("...") each give an arrow to the right module."""
    assert (target in GRAPH[module]) is expected


def test_rooms_stay_small():
    """docs/ARCHITECTURE.md: at most 12 modules at the top of the package, none over 600
    lines anywhere in it (a bigger one is cut by purpose)."""
    top = sorted(p.name for p in ROOTS["sae_fast"].glob("*.py"))
    assert len(top) <= 12, top
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
