"""Imports go one way: cli -> evaluation / toyworld -> methods -> training -> pipeline / generate -> arch -> outputs
(docs/design.md).

Two checks: every package imports on its own in a fresh interpreter (an import cycle often breaks only
when one particular module is imported first) without loading a layer above it, and an AST walk over
the sources finds no import of a higher layer, including imports inside functions.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "erasekit"

#: Per package (or module), the erasekit modules it may never import, at module level or in a function.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "outputs": ("erasekit.arch", "erasekit.methods", "erasekit.pipeline", "erasekit.training", "erasekit.generate"),
    "arch": (
        "erasekit.methods",
        "erasekit.pipeline",
        "erasekit.generate",
        "erasekit.training",
        "erasekit.evaluation",
        "erasekit.toyworld",
        "erasekit.cli",
    ),
    "pipeline": (
        "erasekit.methods",
        "erasekit.generate",
        "erasekit.training",
        "erasekit.evaluation",
        "erasekit.toyworld",
        "erasekit.cli",
    ),
    "generate": ("erasekit.methods", "erasekit.training", "erasekit.evaluation", "erasekit.toyworld", "erasekit.cli"),
    "training": ("erasekit.methods", "erasekit.evaluation", "erasekit.toyworld", "erasekit.sweep", "erasekit.cli"),
    "methods": ("erasekit.evaluation", "erasekit.toyworld", "erasekit.sweep", "erasekit.cli"),
    "evaluation": ("erasekit.toyworld", "erasekit.sweep", "erasekit.cli"),
    # beside evaluation: it may use the library and the ShapesCanvas world (its mask objective), not the CLI
    "sweep": ("erasekit.cli",),
    # beside sweep: the library and the ShapesCanvas world, never the CLI
    "bench": ("erasekit.cli",),
    "attacks": ("erasekit.toyworld", "erasekit.cli"),
}

#: What importing a package in a fresh interpreter must not load (module-level imports only).
NOT_LOADED: dict[str, tuple[str, ...]] = {
    "erasekit.outputs": ("erasekit.arch", "torch"),  # the CLI checks --output before torch is imported
    "erasekit.arch": ("erasekit.methods", "erasekit.pipeline", "erasekit.training"),
    "erasekit.pipeline": ("erasekit.methods", "erasekit.generate", "erasekit.training", "erasekit.evaluation"),
    "erasekit.generate": ("erasekit.methods", "erasekit.training", "erasekit.evaluation", "erasekit.toyworld"),
    "erasekit.training": ("erasekit.methods", "erasekit.evaluation", "erasekit.toyworld", "erasekit.cli"),
    "erasekit.methods": ("erasekit.evaluation", "erasekit.toyworld", "erasekit.cli"),
    "erasekit.methods.mask.fold": ("erasekit.evaluation", "erasekit.toyworld", "erasekit.cli"),
    "erasekit.methods.mask.reference": ("erasekit.evaluation", "erasekit.toyworld", "erasekit.cli"),
    "erasekit.evaluation": ("erasekit.toyworld", "erasekit.cli"),
    "erasekit.toyworld.demo": ("erasekit.cli", "erasekit.sweep"),
    # the package and the command's body load neither torch nor the world: a bad space fails in a second
    "erasekit.sweep": ("erasekit.cli", "erasekit.toyworld", "torch"),
    "erasekit.sweep.command": ("erasekit.cli", "erasekit.toyworld", "torch"),
    "erasekit.attacks": ("erasekit.toyworld", "erasekit.cli"),
    # the CLI checks the bench's flags before torch and the world load
    "erasekit.bench": ("erasekit.cli", "erasekit.toyworld", "torch"),
    "erasekit.cli": (),
}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a source file imports, relative imports resolved, anywhere in the file."""
    package = ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # `from .. import pipeline` imports a module named by the alias
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _violations(layer: str) -> list[str]:
    target = SOURCE / layer
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    bad = []
    for file in files:
        names = {m for m in imported_modules(file) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[layer])}
        # `from ..x import y` yields both x and x.y: name the module once
        bad += [f"{file.relative_to(SOURCE)} imports {m}" for m in sorted(names) if m.rpartition(".")[0] not in names]
    return bad


def test_the_import_walk_resolves_relative_imports():
    names = imported_modules(SOURCE / "methods" / "mask" / "fold.py")
    assert {"erasekit.arch", "erasekit.methods.base", "erasekit.methods.mask.model"} <= names
    assert "erasekit.arch.samplers" in imported_modules(SOURCE / "training" / "gradient.py")
    assert "erasekit.errors" in imported_modules(SOURCE / "arch" / "base.py")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_it(layer):
    assert _violations(layer) == []


def test_the_walk_catches_an_import_that_goes_up(tmp_path, monkeypatch):
    fake = tmp_path / "erasekit"
    (fake / "training").mkdir(parents=True)
    (fake / "training" / "bad.py").write_text("def f():\n    from .. import methods\n")  # inside a function
    (fake / "training" / "good.py").write_text("from ..arch import denoiser_of\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", fake)
    assert _violations("training") == ["training/bad.py imports erasekit.methods"]


@pytest.mark.parametrize("module", sorted(NOT_LOADED))
def test_each_package_imports_alone_in_a_fresh_interpreter(module):
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert module in loaded
    assert sorted(name for name in NOT_LOADED[module] if name in loaded) == []
