"""The device's personal state on disk: θ_k and its JSON sidecar are written atomically, data
first, so a failed save keeps the previous state whole and a restart resumes from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError
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


@pytest.mark.parametrize("damage, what", [
    (lambda d: (d / "personal.json").write_text('{"layout_hash": "x", "epo'), "personal.json: unreadable personal state"),
    (lambda d: (d / "personal.json").write_text('{"epoch": "0", "position": 0, "last_round": 0}'), "lacks integer"),
    (lambda d: (d / "personal.safetensors").write_bytes((d / "personal.safetensors").read_bytes()[:100]),
     "personal.safetensors: unreadable personal state"),
])
def test_a_corrupt_personal_state_is_refused_in_one_line(bundle, tmp_path, damage, what):
    t = _trainer(bundle, tmp_path)
    _one_round(t, 0)
    damage(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match=what) as e:
        _trainer(bundle, tmp_path)
    assert len(str(e.value).splitlines()) == 1 and "move" in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # never overwritten


def test_a_personal_state_with_nan_is_refused(bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    t = _trainer(bundle, tmp_path)
    _one_round(t, 0)
    tensors = load_file(str(tmp_path / "personal.safetensors"))
    first = sorted(k for k in tensors if k.startswith("theta/"))[0]
    tensors[first] = np.full_like(tensors[first], np.nan)
    save_file(tensors, str(tmp_path / "personal.safetensors"))
    with pytest.raises(ConfigError, match=f"non-finite values in {first}"):
        _trainer(bundle, tmp_path)
