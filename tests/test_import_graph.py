"""The package's import graph: no cycles (imports inside functions and TYPE_CHECKING blocks count),
and the data plane (ercstudy.trainables) imports nothing from the control plane (ercstudy.platform)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ercstudy"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every ercstudy module that `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `from ercstudy.x import y` names module x (or the package)
                t = t.rpartition(".")[0]
            if t and t != name and t != "ercstudy":
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports(p, set(files)) for m, p in files.items()}


def test_the_package_has_no_import_cycles():
    g = graph()
    assert "ercstudy.trainables.worker" in g and "ercstudy.platform.study.driver" in g
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(g[m]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_the_data_plane_imports_nothing_from_the_control_plane():
    offenders = {m: sorted(d for d in deps if d.startswith("ercstudy.platform"))
                 for m, deps in graph().items() if m.startswith("ercstudy.trainables")}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_graph_sees_lazy_imports():
    """A check that cannot fail proves nothing: the walker finds imports inside functions."""
    g = graph()
    assert "ercstudy.trainables.parallelize" in g["ercstudy.trainables.checkpoint"]  # imported inside load()
