"""The whole-model device's state across a restart: a new :class:`FullModelTrainer` on the same
``state_dir`` resumes with the old one's model, Ditto's personal ``v_k``, both optimizers' moments
and its place in the data, so its next round is the old trainer's next round, tensor for tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.trainer import RoundSettings
from flexsfl.sim.full_trainer import FullModelTrainer

TRAIN = [Example(f"a {w} film", int(i < 4)) for i, w in enumerate(
    ["good", "great", "lovely", "fine", "bad", "awful", "dull", "poor", "boring"])]


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return load_bundle(tiny_bundles("llama", 2, "ort"))


def _ditto(r: int) -> RoundSettings:
    return RoundSettings(round_id=r, local_steps=3, batch_size=4, lr=0.01, optimizer="adamw", align_lambda=0.0,
                         local_rule="ditto", prox_mu=0.5)


def _round(t: FullModelTrainer, r: int, w: dict) -> dict[str, np.ndarray]:
    t.begin_round(_ditto(r), w)
    torch.manual_seed(r)  # the same dropout draws for both trainers
    t.train_local()
    up, _ = t.upload()
    t.end_round()
    return up


def test_a_restarted_device_resumes_its_model_v_k_moments_and_data(bundle, tmp_path):
    a = FullModelTrainer(bundle, TRAIN, seed=3, state_dir=tmp_path / "dev")
    w0 = {n: p.detach().numpy().copy() for n, p in a.params.items()}
    w1 = _round(a, 0, w0)  # the server would average: any w will do for round 1
    b = FullModelTrainer(bundle, TRAIN, seed=3, state_dir=tmp_path / "dev")  # the device restarts
    assert b.last_round == 0 and (b.cursor.epoch, b.cursor.position) == (a.cursor.epoch, a.cursor.position)
    for n in a.params:
        np.testing.assert_array_equal(b.params[n].detach().numpy(), a.params[n].detach().numpy())
        np.testing.assert_array_equal(b._personal[n].numpy(), a._personal[n].numpy())
    moments = [(role, k) for role in ("w", "v") for st in a._opt[role].state.values() for k in st]
    assert {"exp_avg", "exp_avg_sq", "step"} <= {k for _, k in moments}
    for role in ("w", "v"):
        for n, p in a.params.items():
            for k, v in a._opt[role].state[p].items():
                assert torch.equal(b._opt[role].state[b.params[n]][k], v), (role, n, k)
    up_a, up_b = _round(a, 1, w1), _round(b, 1, w1)  # the next round: the same upload and the same v_k
    for n in up_a:
        np.testing.assert_allclose(up_b[n], up_a[n], rtol=0, atol=1e-7)
        np.testing.assert_allclose(b._personal[n].numpy(), a._personal[n].numpy(), rtol=0, atol=1e-7)
    fresh = FullModelTrainer(bundle, TRAIN, seed=3)  # without a state_dir: the first global model, no v_k
    assert fresh._personal is None and fresh.last_round == -1


def test_state_of_another_model_is_one_clear_error(bundle, tmp_path):
    a = FullModelTrainer(bundle, TRAIN, seed=0, state_dir=tmp_path / "dev")
    _round(a, 0, {n: p.detach().numpy().copy() for n, p in a.params.items()})
    from safetensors.numpy import load_file, save_file

    f = tmp_path / "dev" / "full.safetensors"
    t = load_file(str(f))
    save_file({k: v for k, v in t.items() if not k.startswith("model/") or k.endswith("lora_B.weight")}, str(f))
    with pytest.raises(ConfigError, match="does not fit this bundle's model"):
        FullModelTrainer(bundle, TRAIN, seed=0, state_dir=tmp_path / "dev")
