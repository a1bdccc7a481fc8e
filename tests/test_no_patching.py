"""LibraGHM extends Detectron2 by subclassing and registering only: importing it (and train_net.py)
leaves every attribute of every Detectron2 modeling/engine module, and of the classes they define,
the same object as before."""
import json
import os
import subprocess
import sys

from conftest import REPO

SNAPSHOT = r"""
import importlib, json, pkgutil, sys
import detectron2.engine, detectron2.modeling

names = []
for pkg in (detectron2.modeling, detectron2.engine):
    names.append(pkg.__name__)
    names += [info.name for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)


def snapshot():
    objects = {}
    for name in names:
        for attr, value in vars(sys.modules[name]).items():
            objects[f"{name}.{attr}"] = value
            if isinstance(value, type) and value.__module__ == name:
                for member, obj in vars(value).items():
                    objects[f"{name}.{attr}.{member}"] = obj
    return objects


before = snapshot()
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import libraghm  # noqa: E402,F401
import train_net  # noqa: E402,F401
after = snapshot()
print(json.dumps({
    "checked": len(before),
    "changed": sorted(k for k in before if k in after and after[k] is not before[k]),
    "removed": sorted(k for k in before if k not in after),
    "added": sorted(k for k in after if k not in before),
}))
"""


def test_import_rebinds_nothing_in_detectron2():
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT, os.path.join(REPO, "projects", "LibraGHM"), REPO],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["checked"] > 1500  # every module and class of detectron2.modeling/engine
    assert result["changed"] == []
    assert result["removed"] == []
    assert result["added"] == []


def test_package_source_rebinds_no_detectron2_name():
    """No assignment to a Detectron2 module's or class's attribute anywhere in the package or in
    train_net.py (the one documented exception, train_net.cpu_ddp, is scoped to a `with` block)."""
    import ast

    offenders = []
    roots = [os.path.join(REPO, "projects", "LibraGHM", "libraghm"), os.path.join(REPO, "train_net.py")]
    files = [roots[1]] + [
        os.path.join(d, f) for d, _, fs in os.walk(roots[0]) for f in fs if f.endswith(".py")
    ]
    for path in files:
        tree = ast.parse(open(path).read())
        d2_names = {
            alias.asname or alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            and (getattr(node, "module", None) or "").startswith("detectron2")
            or isinstance(node, ast.Import) and any(a.name.startswith("detectron2") for a in node.names)
            for alias in node.names
        }
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in d2_names:
                    offenders.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Name) and first.id in d2_names:
                    offenders.append(f"{path}:{node.lineno}")
    assert offenders == []
