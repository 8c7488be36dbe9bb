"""Every edge_runtime module imports in a process where importing torch raises."""

import subprocess
import sys

from tests.integration.harness import ROOT, env

SCRIPT = r"""
import importlib, pkgutil, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, NoTorch())
import flexsfl.edge_runtime as edge_runtime
names = [m.name for m in pkgutil.walk_packages(flexsfl.edge_runtime.__path__, "edge_runtime.")]
for name in names:
    importlib.import_module(name)
import flexsfl.cli
flexsfl.cli.build_parser()  # every subcommand's parser, torch-free
assert "torch" not in sys.modules
print(len(names))
"""


def test_edge_runtime_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 15  # wire, backends, trainer, transport, data, text, ...
