"""``--topology u`` in simulate/demo: the config, the (split, top) per client, bundles with the top."""

from __future__ import annotations

import dataclasses

import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.core.cost import ModelCost
from flexsfl.core.errors import ConfigError
from flexsfl.core.model_config import read_model_config
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.core.u_planner import choose_u_split
from flexsfl.sim.config import DEMO, SimConfig
from flexsfl.sim.simulate import _bundle_for, _choose_splits


def test_topology_u_is_strategy_flexpsfl_u_and_refuses_what_does_not_fit():
    assert (dataclasses.replace(DEMO, topology="u").strategy, SimConfig(strategy="flexpsfl-u").topology) == ("flexpsfl-u", "u")
    assert SimConfig().topology == "head-tail" and DEMO.topology == "head-tail"  # the default demo is unchanged
    with pytest.raises(ConfigError, match="splitfed trains one shared model .* --topology head-tail"):
        SimConfig(strategy="splitfed", topology="u")
    with pytest.raises(ConfigError, match="--tops is for U-shaped clients: add --topology u"):
        SimConfig(tops=(1,))
    with pytest.raises(ConfigError, match=r"tops needs 1 or 4 values >= 0"):
        SimConfig(topology="u", tops=(1, 2))


def test_demo_profiles_choose_split_and_top_with_the_u_planner():
    cfg = dataclasses.replace(DEMO, topology="u")
    splits, tops, why = _choose_splits(cfg)
    cost = ModelCost.from_config(read_model_config("minilm"))
    for name, s, u, w in zip(cfg.profiles, splits, tops, why):
        want = choose_u_split(cost, EXAMPLE_PROFILES[name], batch=8, seq=48, optimizer="adamw", runtime="ort", align=True)
        assert (s, u) == (want.split, want.top) == (w["split"], w["top"]) and w["profile"] == name
    # head/tail: no tops
    assert _choose_splits(DEMO)[1] is None
    # pins: --splits with --tops, or --splits alone (top 0), or --tops kept while the planner picks the split
    assert _choose_splits(dataclasses.replace(cfg, splits=(2,), tops=(1, 0, 2, 3)))[:2] == ([2] * 4, [1, 0, 2, 3])
    assert _choose_splits(dataclasses.replace(cfg, splits=(1, 2, 3, 4)))[:2] == ([1, 2, 3, 4], [0] * 4)
    assert _choose_splits(dataclasses.replace(cfg, tops=(0,)))[1] == [0] * 4


@pytest.mark.slow
def test_bundle_for_a_u_client_has_the_top(tmp_path, tiny_model_dirs):
    # causal LM: a decoder classifier's top picks the last token with an int64 ArgMax, which onnxruntime lacks
    cfg = SimConfig(model=str(tiny_model_dirs["llama"]), task="causal_lm", topology="u", splits=(1,), tops=(1,), max_seq=16,
                    batch_size=2, num_labels=2)
    path = _bundle_for(cfg, 1, tmp_path, top=1)
    m = load_bundle(path).manifest
    assert m.extra["top"]["blocks"] == 1 and "ort.top_train" in m.inputs and "-s1-u1-" in path.name
    assert _bundle_for(cfg, 1, tmp_path, top=1) == path  # cached by (split, top)


@pytest.mark.slow
def test_u_shaped_federation_end_to_end_aggregates_what_both_clients_hold(tmp_path):
    """Two U-shaped clients at different (split, top) on MiniLM (6 blocks), over loopback websockets:
    c0 holds blocks 0, 5 and the task head, c1 blocks 0, 1 and the task head. After the round the
    global tensors both hold are exactly the mean of their uploads (64 samples each; the server's
    copy takes no part), and every client step ran its top on the device."""
    import json

    import numpy as np
    from safetensors.numpy import load_file

    from flexsfl.model.partition import block_of
    from flexsfl.sim.simulate import simulate

    cfg = SimConfig(topology="u", model="minilm", data="vader", partition="iid", clients=2, rounds=1, local_steps=4,
                    batch_size=8, lr=2e-3, splits=(1, 2), tops=(1, 0), max_train=32, max_test=16, max_seq=16,
                    eval_every=0, in_process=True, out=str(tmp_path / "run"), bundle_cache=str(tmp_path / "bundles"),
                    num_labels=2)
    summary = simulate(cfg, show=False)
    assert summary["config"]["strategy"] == "flexpsfl-u"
    assert [(c["split"], c["choice"]["top"]) for c in summary["per_client"]] == [(1, 1), (2, 0)]
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    for c in row["clients"].values():
        assert c["steps"] == 4 and c["top_ms"] > 0 and c["samples"] == 32
    state = tmp_path / "run" / "server"
    g = load_file(str(state / "global.safetensors"))
    a, b = (load_file(str(state / "personal" / f"{c}.safetensors")) for c in ("c0", "c1"))
    assert {block_of(n, 6) for n in a} == {0, 5, 6} and {block_of(n, 6) for n in b} == {0, 1, 6}
    both = set(a) & set(b)
    assert both and any(block_of(n, 6) == 6 for n in both)
    for n in both:
        np.testing.assert_allclose(g[n], (a[n].astype(np.float64) + b[n]) / 2, rtol=1e-6, atol=1e-7, err_msg=n)
