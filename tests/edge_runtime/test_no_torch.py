"""Every module of the core and the device package imports where torch cannot be imported.

The modules are discovered (``pkgutil.walk_packages``), so a new one is covered without editing
this file. They are imported one by one in a single fresh interpreter with torch blocked
(:mod:`tests.no_torch`); each module's result is its own test case: it must import, and must not
even *try* to import torch (a module that catches the ImportError and goes on fails too).
"""

from __future__ import annotations

import functools
import json
import pkgutil

import pytest

import flexsfl.core
import flexsfl.edge_runtime
from tests.no_torch import run_without_torch

PACKAGES = (flexsfl.core, flexsfl.edge_runtime)


def device_side_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return names


MODULES = device_side_modules()

IMPORT_EACH = """
import importlib, json, traceback
out = {}
for name in json.loads(_sys.argv[1]):
    before = len(BLOCKED_ATTEMPTS)
    try:
        importlib.import_module(name)
        error = None
    except BaseException as e:
        error = traceback.format_exc(limit=-3)
    out[name] = {"error": error, "torch_attempts": BLOCKED_ATTEMPTS[before:], "torch_loaded": "torch" in _sys.modules}
print(json.dumps(out))
"""


@functools.cache
def _results() -> dict:
    proc = run_without_torch(IMPORT_EACH, json.dumps(MODULES))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_discovery_finds_the_device_side():
    # The packages' own modules, nested ones included, and nothing of the torch side.
    for name in ("flexsfl.core.wire.protocol", "flexsfl.core.bundle", "flexsfl.edge_runtime.client",
                 "flexsfl.edge_runtime.backends.ort", "flexsfl.edge_runtime.trainer"):
        assert name in MODULES
    assert not [m for m in MODULES if m.startswith(("flexsfl.model", "flexsfl.sim", "flexsfl.server_backend"))]


@pytest.mark.parametrize("module", MODULES)
def test_imports_without_torch(module):
    r = _results()[module]
    assert r["error"] is None, f"{module} does not import without torch:\n{r['error']}"
    assert not r["torch_attempts"], f"{module} tries to import {r['torch_attempts']} at import time; import it lazily"
    assert not r["torch_loaded"]


def test_the_blocker_blocks():
    # The check above can fail: a module that imports torch is caught.
    proc = run_without_torch("import json\ntry:\n    import torch.nn\nexcept ImportError as e:\n    print(json.dumps([str(e), BLOCKED_ATTEMPTS]))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    msg, attempts = json.loads(proc.stdout)
    assert "torch is blocked" in msg and attempts == ["torch"]


def test_every_command_parser_builds_without_torch():
    # ``flexsfl --help`` and the edge commands' parsers work on a device: building the whole
    # parser tree loads no torch (handlers load what they need when they run).
    proc = run_without_torch("from flexsfl.cli import build_parser\nbuild_parser().parse_args(['edge', 'run'])\n"
                             "assert not BLOCKED_ATTEMPTS, BLOCKED_ATTEMPTS\nprint('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
