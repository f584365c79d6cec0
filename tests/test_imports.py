"""The import rules of docs/architecture.md, read from the source: the API never reaches torch, and
each package imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("core", "api", "batcher", "model_store", "sentiment", "benchmarks")
# What each package may import of ours, beside itself (docs/architecture.md, "Packages"). `sentiment`
# (the CLI and `serve`) and `benchmarks` are the top: they may import anything.
ALLOWED = {
    "core": set(),
    "api": {"core"},
    "model_store": {"core"},
    "batcher": {"core", "model_store"},
}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, by its full dotted name (relative imports are not used here)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def sources() -> dict[str, Path]:
    return {module_of(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def allowed(importer: str, imported: str, rules: set[str]) -> bool:
    return any(imported == rule or imported.startswith(f"{rule}.") for rule in rules)


def test_each_package_imports_only_the_layers_below_it() -> None:
    broken = []
    for module, path in sources().items():
        rule = next((r for r in ALLOWED if module == r or module.startswith(f"{r}.")), None)
        if rule is None:  # the top: the CLI, `serve` and the benchmarks may import anything
            continue
        own = rule
        for name in filter(ours, imports(path)):
            if not (name == own or name.startswith(f"{own}.") or allowed(module, name, ALLOWED[rule])):
                broken.append(f"{module} imports {name}")
    assert broken == []


def test_nothing_imports_the_command_line() -> None:
    importers = {
        m for m, p in sources().items() for name in imports(p) if name == "sentiment" or name.startswith("sentiment.")
    }
    assert {m for m in importers if not m.startswith(("sentiment", "benchmarks"))} == set()
    assert {m for m, p in sources().items() if "sentiment.cli" in imports(p) and m != "sentiment.cli"} == set()


def test_the_api_never_reaches_torch_transformers_or_the_model_code() -> None:
    modules = sources()
    seen, todo = set(), [m for m in modules if m == "api" or m.startswith("api.")]
    reached = set()
    while todo:
        module = todo.pop()
        if module in seen or module not in modules:
            continue
        seen.add(module)
        for name in imports(modules[module]):
            reached.add(name.split(".")[0])
            todo += [m for m in (name, name.rsplit(".", 1)[0]) if m in modules]
    assert not reached & {"torch", "transformers", "tokenizers", "onnxruntime", "model_store", "numpy"}, reached
