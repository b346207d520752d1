"""The package's import structure: data flows one way (architecture), so no module imports one that imports it
back, and no component reaches up into the pipeline (`stages.py`) or the app."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lcrec_chat"
TOP = {"stages", "cli", "__main__", "ui"}   # the pipeline and the app compose components; nothing imports them


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Package-internal modules a file imports (relative or absolute, at any depth, lazy imports included)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = [p for p in base if p] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("lcrec_chat"):
                target = node.module.split(".")[1:]
            else:
                continue
            names = [".".join(target + [a.name]) for a in node.names]
            found |= {n for n in names if (PACKAGE / (n.replace(".", "/") + ".py")).exists()
                      or (PACKAGE / n.replace(".", "/")).is_dir()} or {".".join(target)}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("lcrec_chat.")}
    return {f for f in found if f}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle():
    edges = graph()
    assert edges.get("stages"), "the import graph was not read"   # the pipeline imports many components
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_components_never_import_the_pipeline_or_the_app():
    for name, targets in graph().items():
        if name.split(".")[0] not in TOP:
            assert not targets & TOP, f"{name} imports {sorted(targets & TOP)}"
