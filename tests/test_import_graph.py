"""The package's import graph: no cycles (imports inside functions and TYPE_CHECKING blocks count), the control
plane's layers import only downward, and the data plane (ercstudy.trainables) imports nothing from the control plane
(ercstudy.platform)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ercstudy"

# The control plane, top to bottom: a module may import its own layer and the layers below it, never one above.
LAYERS = ("cli", "report", "study", "data", "tracking", "cluster")


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


def layer(module: str) -> int | None:
    """The rank of a control-plane module's layer (0 = the top), None outside the control plane's layers."""
    parts = module.split(".")
    if parts[:2] != ["ercstudy", "platform"] or len(parts) < 3:
        return None
    return LAYERS.index(parts[2]) if parts[2] in LAYERS else None


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


def test_every_control_plane_module_lives_in_a_layer():
    loose = [m for m in graph() if m.startswith("ercstudy.platform.") and layer(m) is None]
    assert not loose, f"modules outside {LAYERS}: {loose}"


def test_the_control_plane_imports_only_downward():
    upward = {m: sorted(d for d in deps if layer(d) is not None and layer(d) < layer(m))
              for m, deps in graph().items() if layer(m) is not None}
    assert not {m: d for m, d in upward.items() if d}


def test_the_data_plane_imports_nothing_from_the_control_plane():
    offenders = {m: sorted(d for d in deps if d.startswith("ercstudy.platform"))
                 for m, deps in graph().items() if m.startswith("ercstudy.trainables")}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_graph_sees_lazy_imports_and_upward_ones():
    """A check that cannot fail proves nothing: the walker finds imports inside functions, and ranks layers."""
    g = graph()
    assert "ercstudy.trainables.parallelize" in g["ercstudy.trainables.checkpoint"]  # imported inside load()
    assert "ercstudy.platform.study.trial" in g["ercstudy.platform.cli"]  # imported inside a command
    assert layer("ercstudy.platform.cli") < layer("ercstudy.platform.report.figures") < layer("ercstudy.platform.study.spec")
    assert layer("ercstudy.platform.tracking.client") < layer("ercstudy.platform.cluster.storage")
