"""The ORT backend imports onnxruntime without the training wheel's ORTModule check (torch, onnx).

x86's ``onnxruntime-training`` wheel imports ORTModule, and so torch, when ``onnxruntime`` is
imported; every demo client paid that at start-up. Each case runs in a fresh interpreter, where
torch is installed and importable.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
{prelude}
import onnxruntime
out = {{"torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules, "version": onnxruntime.__version__}}
{after}
print(json.dumps(out))
"""


def _run(prelude: str, after: str = "") -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude, after=after)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_backend_import_leaves_torch_and_onnx_out():
    got = _run("from flexsfl.edge_runtime.backends.ort import import_onnxruntime; import_onnxruntime()",
               # the training package is still importable afterwards (the exporter's ORT artifacts use it)
               after='import importlib.util; out["training"] = importlib.util.find_spec("onnxruntime.training") is not None; '
                     'import onnxruntime.training.artifacts; out["later"] = True')
    assert got["torch"] is False and got["onnx"] is False
    assert got["later"] is True


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime.training") is None, reason="plain onnxruntime wheel: no check")
def test_plain_import_pulls_torch_on_the_training_wheel():
    # What the helper avoids: without it the same import loads torch (so the test above is not vacuous).
    assert _run("")["torch"] is True
