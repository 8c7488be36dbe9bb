"""The layers hold: import-linter's contracts are kept, and shared code loads heavy runtimes lazily.

``tools/lint_imports.sh`` checks the contracts in pyproject.toml's ``[tool.importlinter]`` (the
layers core <- model <- export | edge_runtime | server_backend <- sim | deploy <- benchmarks <-
cli, and the device side importing no torch). import-linter sees every import, lazy ones
included; the second test adds what it cannot say: a module of the core or the device package
may *name* a heavy runtime only inside a function, never at import time.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runtimes that are optional on a device or heavy to import: looked up where they are needed.
LAZY = ("torch", "transformers", "peft", "executorch", "onnxruntime", "onnx", "onnxscript")


def test_import_contracts_are_kept():
    out = subprocess.run(["bash", str(ROOT / "tools" / "lint_imports.sh")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "0 broken" in text and " kept" in text, text[-4000:]
    assert "BROKEN" not in text, text[-4000:]


def _mapped_folders() -> dict[str, pathlib.Path]:
    """Installed package name -> its folder in the repository (pyproject's package-dir)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {pkg: ROOT / folder for pkg, folder in tool["package-dir"].items()}
    out = {}
    for pkg in tool["packages"]:
        base = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len)
        out[pkg] = dirs[base].joinpath(*pkg[len(base):].split(".")[1:])
    return out


def _device_side_files() -> list[tuple[str, pathlib.Path]]:
    folders = _mapped_folders()
    files = []
    for pkg in ("flexsfl.core", "flexsfl.edge_runtime"):
        for f in sorted(folders[pkg].rglob("*.py")):
            files.append((f"{pkg}.{'.'.join(f.relative_to(folders[pkg]).with_suffix('').parts)}", f))
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every import that runs when the module is imported: module and class
    bodies, including ``if``/``try``/``with`` blocks, but not function bodies or ``if
    TYPE_CHECKING:`` blocks."""
    found = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(s, ast.Import):
                found.extend((s.lineno, a.name) for a in s.names)
            elif isinstance(s, ast.ImportFrom) and s.level == 0 and s.module:
                found.append((s.lineno, s.module))
            elif isinstance(s, ast.If):
                if not _is_type_checking(s.test):
                    visit(s.body)
                visit(s.orelse)
            else:
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(s, field, []))
                for h in getattr(s, "handlers", []):
                    visit(h.body)
                for case in getattr(s, "cases", []):
                    visit(case.body)

    visit(tree.body)
    return found


def test_the_checker_sees_import_time_imports_only():
    src = (
        "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "try:\n    import onnxruntime as ort\nexcept ImportError:\n    ort = None\n"
        "class A:\n    import transformers\n    def f(self):\n        import peft\n"
        "def g():\n    import executorch\n"
    )
    assert import_time_imports(ast.parse(src)) == [(1, "os"), (2, "typing"), (6, "onnxruntime"), (10, "transformers")]


@pytest.mark.parametrize("name, path", _device_side_files(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_heavy_runtime_at_import_time(name, path):
    heavy = [f"{path.relative_to(ROOT)}:{line}: import {mod}" for line, mod in import_time_imports(ast.parse(path.read_text()))
             if mod.split(".")[0] in LAZY]
    assert not heavy, f"{name} imports a heavy runtime at import time; import it inside the function that needs it: {heavy}"


# Notes that live outside the repository; code comments state the fact itself instead.
OUTSIDE = ("DESIGN.md", "STYLE.md", "models-and-data.md", "runtime-recipes")


def test_no_comment_points_outside_the_repository():
    hits = []
    files = [f for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith((".", "build")) for f in d.rglob("*.py")]
    for f in sorted(files):
        rel = f.relative_to(ROOT)
        if f == pathlib.Path(__file__).resolve():
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            hits += [f"{rel}:{i}: {name}" for name in OUTSIDE if name in line]
    assert not hits, hits


def test_the_architecture_doc_names_every_package():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    missing = [p for p in packages if p != "flexsfl" and f"`{p}`" not in doc and f"`{p.rsplit('.', 1)[1]}/`" not in doc]
    assert not missing, f"docs/architecture.md does not say what {missing} hold; add a line per package"
