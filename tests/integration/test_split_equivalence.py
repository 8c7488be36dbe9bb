"""Split training over real websockets equals centralized eager training.

One ``flexsfl serve`` process and one or two ``flexsfl edge run`` processes on loopback, SGD,
fixed data order, 10 steps: the adapters and task head the server persists after the round equal
those of an eager PyTorch reference that trains the same full Hugging Face model on the same
batches, in the order the server applied them (rel err <= 1e-4).
"""

from __future__ import annotations

import json

import pytest

from tests.no_torch import sitecustomize_dir

from .harness import ROOT
from .reference import STEPS, check, federate, make_work, order, reference


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dirs, tiny_bundles):
    return make_work(tmp_path_factory, tiny_model_dirs, tiny_bundles)


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_one_client_equals_centralized(work, tmp_path, backend):
    clients = [("a", 2, backend)]
    extra_env = None
    if backend == "ort":
        # The ORT client runs where importing torch raises (sitecustomize installs the blocker).
        blocker = sitecustomize_dir(tmp_path / "notorch", tmp_path / "notorch.mark")
        extra_env = {"PYTHONPATH": f"{blocker}:{ROOT}"}
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
