"""The layering written in docs/architecture.md, checked on every import statement of the package.

Imports inside functions count as much as those at the top of a module: a function-local import
does not make a forbidden dependency or a cycle acceptable.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import bdh

PACKAGE = Path(bdh.__file__).parent
DOC = PACKAGE.parent / "docs" / "architecture.md"


def layer_table(text: str) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """(layer -> module prefixes, layer -> layers it may import) from the doc's table."""
    modules, allowed = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        layer = cells[0]
        modules[layer] = re.findall(r"`([\w.]+)", cells[1])
        allowed[layer] = {layer} | {name.strip() for name in cells[2].split(",") if name.strip()}
    return modules, allowed


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, source: str) -> set[str]:
    """Every bdh module the source imports, at any depth of the code."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from bdh.x import y` imports the module bdh.x.y when there is one, else names of bdh.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "bdh" or t.startswith("bdh.")}
    return found - {name}


def layer_of(module: str, modules: dict[str, list[str]]) -> str | None:
    best, best_len = None, -1
    for layer, prefixes in modules.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix != "bdh" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def violations(graph: dict[str, set[str]], modules, allowed) -> list[str]:
    found = []
    for source, targets in sorted(graph.items()):
        layer = layer_of(source, modules)
        if layer is None:
            found.append(f"{source} is in no layer of docs/architecture.md")
            continue
        for target in sorted(targets):
            target_layer = layer_of(target, modules)
            if target_layer not in allowed[layer]:
                found.append(f"{source} ({layer}) imports {target} ({target_layer})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle or more."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path.read_text()) for name, path in MODULES.items()}


def test_the_doc_has_a_layer_for_every_module():
    modules, allowed = layer_table(DOC.read_text())
    assert {"core", "ops", "models", "cli"} <= set(modules)
    assert all(allowed[layer] <= set(modules) for layer in allowed), "a 'may import' names no layer"
    assert [m for m in MODULES if layer_of(m, modules) is None] == []


def test_every_import_follows_the_layers():
    modules, allowed = layer_table(DOC.read_text())
    assert violations(package_graph(), modules, allowed) == []


def test_no_import_cycles():
    assert cycles(package_graph()) == []


def test_forbidden_imports_are_caught_even_inside_functions():
    """The check itself: ops importing a model, a model importing train, anything importing cli."""
    modules, allowed = layer_table(DOC.read_text())
    graph = package_graph()
    graph["bdh.ops.naive"] = graph["bdh.ops.naive"] | imports_of(
        "bdh.ops.naive", "def f():\n    from bdh.model import BDH\n    from bdh import cli\n")
    graph["bdh.model"] = graph["bdh.model"] | imports_of("bdh.model", "def g():\n    import bdh.train.loop\n")
    found = violations(graph, modules, allowed)
    assert "bdh.ops.naive (ops) imports bdh.model (models)" in found
    assert "bdh.ops.naive (ops) imports bdh.cli (cli)" in found
    assert "bdh.model (models) imports bdh.train.loop (train)" in found
    assert ["bdh.fileio", "bdh.ops.naive"] in cycles({"bdh.fileio": {"bdh.ops.naive"}, "bdh.ops.naive": {"bdh.fileio"}})
