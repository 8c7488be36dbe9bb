"""The numpy optimizers against torch.optim, step for step, and their state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.optim import SGD, AdamW, make_optimizer

SHAPES = {"layer.0.q.lora_A.weight": (8, 32), "layer.0.q.lora_B.weight": (32, 8), "bias": (5,)}


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _grads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Scales spread over orders of magnitude, as LoRA gradients are.
    return {n: (rng.standard_normal(s) * 10.0 ** rng.integers(-4, 1)).astype(np.float32) for n, s in SHAPES.items()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _run_both(ours, make_torch, steps: int, seed: int = 0) -> float:
    """Max relative difference of the parameters after each of ``steps`` identical steps."""
    params = _params(seed)
    tparams = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in params.items()}
    topt = make_torch(list(tparams.values()))
    rng = np.random.default_rng(seed + 1)
    worst = 0.0
    for _ in range(steps):
        grads = _grads(rng)
        ours.step(params, grads)
        for n, p in tparams.items():
            p.grad = torch.from_numpy(grads[n].copy())
        topt.step()
        worst = max(worst, max(_rel(params[n], tparams[n].detach().numpy()) for n in params))
    return worst


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.01, momentum=0.5, weight_decay=0.1),
    dict(lr=0.01, weight_decay=0.01, momentum=0.8, nesterov=True),
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_matches_torch(kw):
    assert _run_both(SGD(**kw), lambda ps: torch.optim.SGD(ps, **kw), steps=8) <= 1e-6


ADAMW_CASES = [
    dict(lr=1e-3),  # torch's defaults, weight_decay 0.01 included
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
    dict(lr=3e-4, weight_decay=0.1),
]


@pytest.mark.parametrize("kw", ADAMW_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_adamw_matches_torch(kw):
    assert _run_both(AdamW(**kw), lambda ps: torch.optim.AdamW(ps, **kw), steps=8) <= 1e-6


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-5, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.05]),
    seed=st.integers(0, 2**16),
)
def test_sgd_matches_torch_for_any_settings(lr, momentum, weight_decay, seed):
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    assert _run_both(SGD(**kw), lambda ps: torch.optim.SGD(ps, **kw), steps=5, seed=seed) <= 1e-6


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-5, 1e-1),
    b1=st.sampled_from([0.0, 0.8, 0.9]),
    b2=st.sampled_from([0.9, 0.99, 0.999]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_adamw_matches_torch_for_any_settings(lr, b1, b2, weight_decay, seed):
    kw = dict(lr=lr, betas=(b1, b2), weight_decay=weight_decay)
    assert _run_both(AdamW(**kw), lambda ps: torch.optim.AdamW(ps, **kw), steps=5, seed=seed) <= 1e-6


@pytest.mark.parametrize("name,kw", [("sgd", dict(momentum=0.9)), ("adamw", {})])
def test_state_survives_a_safetensors_checkpoint(tmp_path, name, kw):
    """Three steps, checkpoint, a fresh optimizer, three more == six steps without a break."""
    rng = np.random.default_rng(3)
    grads = [_grads(rng) for _ in range(6)]
    straight, resumed = _params(0), _params(0)
    a = make_optimizer(name, lr=0.01, **kw)
    for g in grads:
        a.step(straight, g)
    b = make_optimizer(name, lr=0.01, **kw)
    for g in grads[:3]:
        b.step(resumed, g)
    save_file(b.state_dict(), tmp_path / "opt.safetensors")
    c = make_optimizer(name, lr=0.01, **kw)
    c.load_state_dict(load_file(tmp_path / "opt.safetensors"))
    for g in grads[3:]:
        c.step(resumed, g)
    for n in straight:
        np.testing.assert_array_equal(resumed[n], straight[n])


def test_state_dict_is_a_copy():
    opt, params = SGD(0.1, momentum=0.9), _params(0)
    opt.step(params, _grads(np.random.default_rng(0)))
    state = opt.state_dict()
    before = {k: v.copy() for k, v in state.items()}
    opt.step(params, _grads(np.random.default_rng(1)))
    for k in state:
        np.testing.assert_array_equal(state[k], before[k])


@pytest.mark.parametrize("opt", [SGD(0.1, momentum=0.9), AdamW(1e-3)], ids=["sgd", "adamw"])
def test_a_bad_gradient_changes_nothing(opt):
    params = _params(0)
    opt.step(params, _grads(np.random.default_rng(0)))
    snapshot = {n: a.copy() for n, a in params.items()}
    state = opt.state_dict()
    bad = _grads(np.random.default_rng(1))
    bad["bias"] = np.zeros(6, np.float32)
    with pytest.raises(ConfigError, match="gradient of 'bias' has shape"):
        opt.step(params, bad)
    missing = _grads(np.random.default_rng(1))
    del missing["bias"]
    with pytest.raises(ConfigError, match="no gradient for 'bias'"):
        opt.step(params, missing)
    for n in params:
        np.testing.assert_array_equal(params[n], snapshot[n])
    after = opt.state_dict()
    assert after.keys() == state.keys() and all(np.array_equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: SGD(0.0), "lr must be > 0"),
        (lambda: SGD(0.1, momentum=-1), "momentum and weight_decay"),
        (lambda: SGD(0.1, nesterov=True), "nesterov needs momentum"),
        (lambda: AdamW(1e-3, betas=(1.0, 0.9)), "betas"),
        (lambda: AdamW(1e-3, eps=0), "eps > 0"),
        (lambda: make_optimizer("adam", lr=0.1), "unknown optimizer 'adam'"),
    ],
)
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_state_of_another_optimizer_is_refused():
    sgd = SGD(0.1, momentum=0.9)
    params = _params(0)
    sgd.step(params, _grads(np.random.default_rng(0)))
    with pytest.raises(ConfigError, match="unexpected key 'momentum/"):
        AdamW(1e-3).load_state_dict(sgd.state_dict())


def test_parameters_must_be_writable_float32():
    params = _params(0)
    params["bias"] = params["bias"].astype(np.float64)
    with pytest.raises(ConfigError, match="writable float32"):
        SGD(0.1).step(params, _grads(np.random.default_rng(0)))
