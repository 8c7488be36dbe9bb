"""Split training over real websockets equals centralized eager training.

One ``flexsfl serve`` process and one or two ``flexsfl edge run`` processes on loopback, SGD,
fixed data order, 10 steps: the adapters and task head the server persists after the round equal
those of an eager PyTorch reference that trains the same full Hugging Face model on the same
batches, in the order the server applied them (rel err <= 1e-4).
"""

from __future__ import annotations

import json

import pytest

from .harness import ROOT
from .reference import STEPS, check, federate, make_work, order, reference


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dirs, tiny_bundles):
    return make_work(tmp_path_factory, tiny_model_dirs, tiny_bundles)


NO_TORCH = """
import os, sys
open(os.environ["NO_TORCH_MARK"], "a").write(f"{os.getpid()}\\n")  # proves the blocker was loaded
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: this process plays an edge device without torch")
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_one_client_equals_centralized(work, tmp_path, backend):
    clients = [("a", 2, backend)]
    extra_env = None
    if backend == "ort":
        # The ORT client runs where importing torch raises (sitecustomize installs the blocker).
        (tmp_path / "notorch").mkdir()
        (tmp_path / "notorch" / "sitecustomize.py").write_text(NO_TORCH)
        extra_env = {"PYTHONPATH": f"{tmp_path / 'notorch'}:{ROOT}", "NO_TORCH_MARK": str(tmp_path / "notorch.mark")}
    state = federate(work, tmp_path, clients, extra_env=extra_env)
    if backend == "ort":
        assert (tmp_path / "notorch.mark").read_text().strip()
    steps = order(state)
    assert steps == [("a", i) for i in range(STEPS)]
    check(state, reference(work, clients, steps))
    personal = json.loads((tmp_path / "state-a" / "personal.json").read_text())
    assert personal["last_round"] == 0


def test_two_clients_at_different_splits_equal_centralized(work, tmp_path):
    clients = [("a", 1, "ort"), ("b", 3, "ort")]
    state = federate(work, tmp_path, clients)
    steps = order(state)
    assert sorted(steps) == sorted([(c, i) for c in ("a", "b") for i in range(STEPS)])
    check(state, reference(work, clients, steps))
