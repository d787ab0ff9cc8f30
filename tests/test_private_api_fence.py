"""The private-API fence: every private name of Ray, DeepSpeed, Optuna, MLflow or torch that ercstudy uses lives in
one module per plane (platform/cluster/private_apis.py, trainables/private_apis.py); elsewhere there is none."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ercstudy"
FENCES = {PACKAGE / "platform" / "cluster" / "private_apis.py", PACKAGE / "trainables" / "private_apis.py"}
LIBRARIES = ("ray", "deepspeed", "optuna", "mlflow", "torch")
# Ray's settings that its documentation gives users (auth, the cluster address, Tune's output engine); any other
# RAY_* variable is an internal one and is named in a fence
PUBLIC_RAY_SETTINGS = {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AIR_NEW_OUTPUT"}


def private_uses(path: Path) -> list[str]:
    """Private names `path` uses: a library module path with a `_`-part, `lib._x` attributes, `__internal` resources,
    and internal RAY_* settings (string constants)."""
    tree = ast.parse(path.read_text())
    imported: dict[str, str] = {}  # local name -> the library module or object it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in LIBRARIES:
                    imported[(a.asname or a.name).split(".")[0]] = a.name
                    if any(p.startswith("_") for p in a.name.split(".")):
                        found.append(f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES and not node.level:
            for a in node.names:
                imported[a.asname or a.name] = f"{node.module}.{a.name}"
                if any(p.startswith("_") for p in [*node.module.split("."), a.name]):
                    found.append(f"from {node.module} import {a.name}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")
              and not str(node.args[1].value).startswith("__")):
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if "__internal" in v or (re.fullmatch(r"RAY_\w+", v) and v not in PUBLIC_RAY_SETTINGS):
                found.append(repr(v))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_private_api_outside_the_fences():
    outside = {str(p.relative_to(PACKAGE)): uses for p in sorted(PACKAGE.rglob("*.py")) if p not in FENCES
               if (uses := private_uses(p))}
    assert not outside


def test_the_check_sees_each_kind_of_private_use(tmp_path):
    """A check that cannot fail proves nothing: each kind of private use in a module is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("import ray._private.worker\nfrom optuna.trial import _dispatch\n"
                     "HEAD = {'node:__internal_head__': 0.001}\nENV = 'RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S', 'RAY_health_check_timeout_ms'\n"
                     "def f(trial, engine):\n    return trial._trial_id, engine._config, getattr(engine, '_config', None), self._ok\n")
    uses = private_uses(probe)
    assert len(uses) == 8 and not any("self._ok" in u for u in uses), uses
    assert all(private_uses(f) for f in FENCES)  # the fences hold what they are for
