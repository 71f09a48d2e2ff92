"""The package's shape: no two of fastbp's modules import each other, even lazily (inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastbp

ROOT = Path(fastbp.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Each fastbp module's imports of other fastbp modules (relative or absolute, at any depth of the
    file), leaving out the package itself, whose __init__ re-exports the public names."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.with_suffix("").relative_to(ROOT.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t not in (name, "fastbp")}
    return graph


def test_no_import_cycles():
    graph = _imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph[node]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"
    assert "fastbp.trainer" in graph["fastbp.checkpoint"] or "fastbp.checkpoint" in graph["fastbp.trainer"]
