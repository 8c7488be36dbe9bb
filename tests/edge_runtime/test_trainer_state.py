"""The device's personal state on disk: θ_k and its JSON sidecar are written atomically, data
first, so a failed save keeps the previous state whole and a restart resumes from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.edge_runtime.backends import open_backend
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.trainer import HeadTrainer, RoundSettings

TRAIN = [Example(f"example number {i} says {'yes' if i % 2 else 'no'}", i % 2) for i in range(12)]


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return load_bundle(tiny_bundles("gpt2", 1, "ort"))


def _trainer(bundle, state_dir) -> HeadTrainer:
    return HeadTrainer(bundle, open_backend("ort", bundle, threads=1), TRAIN, state_dir=state_dir)


def _one_round(t: HeadTrainer, round_id: int) -> None:
    t.begin_round(RoundSettings(round_id, 1, 4, 0.5, "sgd", 0.0), None if t.has_personal else t.backend.get_params())
    step = t.forward()
    t.backward(np.full(step.z.shape, 0.01, np.float32), 1.0)
    t.end_round()


def test_state_round_trips_and_leaves_no_temporary_files(bundle, tmp_path):
    t = _trainer(bundle, tmp_path)
    _one_round(t, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["personal.json", "personal.safetensors"]
    meta = json.loads((tmp_path / "personal.json").read_text())
    assert meta["last_round"] == 0 and meta["layout_hash"] == bundle.manifest.layout_hash
    again = _trainer(bundle, tmp_path)
    assert again.last_round == 0 and again.has_personal
    for n, a in t.backend.get_params().items():
        np.testing.assert_array_equal(again.backend.get_params()[n], a)


def test_a_failed_save_keeps_the_previous_state_and_its_sidecar(bundle, tmp_path, monkeypatch):
    t = _trainer(bundle, tmp_path)
    _one_round(t, 0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    import safetensors.numpy

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _one_round(t, 1)
    # neither file changed: the sidecar is never written ahead of its data, and no temporary is left
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _trainer(bundle, tmp_path).last_round == 0
