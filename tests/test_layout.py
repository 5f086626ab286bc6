"""The package's shape: layers that only import downwards, no import circle, small modules.

The imports are read from the source (every ``import`` statement, also those inside functions),
so a circle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "crossgap_fast"
MAX_LINES = 400

#: Lower layers never import higher ones. Modules not listed (the package's root and
#: ``__main__``) may import anything.
LAYERS = {
    "base": ("version", "defaults", "errors", "files", "safe_pickle", "images", "progress", "threads",
             "demo.assets"),
    "solver": ("kernels", "checkpoints", "models", "towers", "inversion", "api"),
    "pipeline": ("pipeline",),
    "eval": ("eval",),
    "apps": ("cli", "demo"),
}
ORDER = list(LAYERS)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports (``""`` is the package itself)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if name else []
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                full = "crossgap_fast" + ("." + mod if mod else "")
            else:
                full = node.module or ""
            # ``from pkg import sub`` depends on ``pkg.sub``; ``from mod import name`` on ``mod``
            subs = [f"{full}.{a.name}" for a in node.names]
            targets = [t for t in subs if t[len("crossgap_fast."):] in known] or [full]
        else:
            continue
        for t in targets:
            if t == "crossgap_fast" or t.startswith("crossgap_fast."):
                rel = t[len("crossgap_fast."):] if "." in t else ""
                if rel in known:
                    out.add(rel)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (layer, len(p))
    return best[0] if best else None


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n == "":  # the package root re-exports; importing it from inside is a layer error
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_walk_sees_imports():
    graph = _graph()
    assert {"inversion.inverter", "kernels", "pipeline.run", "eval.harness", "cli"} <= set(graph)
    assert "inversion.config" in graph["inversion.inverter"]  # a module-level import
    assert "" in graph["__main__"] or "cli" in graph["__main__"]


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_downwards():
    wrong = []
    for mod, deps in _graph().items():
        layer = _layer(mod)
        if layer is None:
            continue
        for dep in deps:
            if dep == "":
                wrong.append(f"{mod} imports the package root")
                continue
            dep_layer = _layer(dep)
            if dep_layer is not None and ORDER.index(dep_layer) > ORDER.index(layer):
                wrong.append(f"{mod} ({layer}) imports {dep} ({dep_layer})")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m not in ("", "__main__") and _layer(m) is None] == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_small(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (at most {MAX_LINES})"
