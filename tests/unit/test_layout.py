"""The layout's rules, checked on the source: where SQL may be, where Celery may be, no cycles.

Read from the source (ast), not from sys.modules: an import inside a function counts too, as it
is a dependency all the same.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cicd", "workers")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno, id(node) in top_level))
            # `from cicd.store import executions` imports the submodule too.
            out += [(f"{base}.{alias.name}", node.lineno, id(node) in top_level) for alias in node.names]
    return out


MODULES = _modules()


def _where(prefix: str, allowed) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {mod}"
            for name, path in MODULES.items() if not allowed(name)
            for mod, line, _ in _imports(name, path) if mod == prefix or mod.startswith(prefix + ".")]


def test_sql_is_only_in_the_store():
    assert _where("sqlalchemy", lambda name: name == "cicd.store" or name.startswith("cicd.store.")) == []


def test_the_domain_imports_no_celery():
    # cicd/ is the domain and the tools around it; workers/ holds the thin Celery tasks over it.
    assert _where("celery", lambda name: name.startswith("workers")) == []
    assert _where("kombu", lambda name: name.startswith("workers")) == []


def test_no_import_cycles_at_module_level():
    graph = {name: {mod for mod, _, top in _imports(name, path) if top and mod in MODULES and mod != name}
             for name, path in MODULES.items()}
    # A package's __init__ is imported before its submodules: an edge package -> its own submodule
    # is how re-exports work, not a cycle, unless the submodule imports the package back.
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert cycles == []
