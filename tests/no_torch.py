"""Run code in a Python process where importing torch raises, as on a device without torch.

One blocker for every torch-free check: a meta-path finder, first on ``sys.meta_path``, that
raises ``ImportError`` for ``torch`` and its submodules and records each attempt in
``BLOCKED_ATTEMPTS`` (a module that catches the error and goes on still shows up there).

- :func:`run_without_torch` runs a snippet in a fresh interpreter with the blocker installed.
- :func:`sitecustomize_dir` writes a ``sitecustomize.py`` that installs it in every Python process
  started with that folder first on ``PYTHONPATH`` (for processes a test does not start itself).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from tests.integration.harness import ROOT, env

__all__ = ["BLOCKER", "run_without_torch", "sitecustomize_dir"]

BLOCKER = """
import sys as _sys

BLOCKED_ATTEMPTS = []


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            BLOCKED_ATTEMPTS.append(name)
            raise ImportError(f"{name} is blocked: this process plays a device without torch")
        return None


_sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(code: str, *args: str, timeout: float = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -c BLOCKER + code ARGS`` from the repository root; the caller checks the result."""
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env(extra_env), timeout=timeout)


def sitecustomize_dir(folder: pathlib.Path, mark: pathlib.Path) -> pathlib.Path:
    """Write ``folder/sitecustomize.py`` with the blocker; each process that loads it appends its pid
    to ``mark`` (so a test can prove the blocker was in place). Put ``folder`` first on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import os\nopen({str(mark)!r}, 'a').write(f'{{os.getpid()}}\\n')\n" + BLOCKER)
    return folder
