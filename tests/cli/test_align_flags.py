"""``--align feature-kl|logit-kl``: where the alignment term is computed, from the command line
(``simulate``, ``demo``, ``serve``) to the server's TrainConfig and each round's plan; refused in
one line where it cannot act (U-shaped clients, ``--align-every``); the device clock's cost of a
logit_kl step (Z' up with Z, a second pass through the tail); the benchmark runs that use it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flexsfl.cli.config_args import config_from_args
from flexsfl.cli.main import build_parser
from flexsfl.cli.serve import train_config
from flexsfl.core.cost import ModelCost
from flexsfl.core.errors import ConfigError
from flexsfl.core.model_config import read_model_config
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.server_backend.strategy import TrainConfig, make_strategy
from flexsfl.sim.clock import split_client
from flexsfl.sim.config import DEMO, SimConfig

SERVE = ["serve", "--model", "minilm", "--clients", "clients.json", "--state-dir", "state"]


@pytest.mark.parametrize("cmd, base", [("simulate", SimConfig()), ("demo", DEMO)])
def test_simulate_and_demo_take_align(cmd, base):
    assert config_from_args(SimConfig, build_parser().parse_args([cmd]), base=base).alignment == "feature_kl"
    cfg = config_from_args(SimConfig, build_parser().parse_args([cmd, "--align", "logit-kl"]), base=base)
    assert cfg.alignment == "logit_kl"
    with pytest.raises(SystemExit):
        build_parser().parse_args([cmd, "--align", "logits"])


def test_sim_config_refuses_logit_kl_where_it_cannot_act():
    with pytest.raises(ConfigError, match="--align logit-kl is for head/tail clients"):
        SimConfig(alignment="logit-kl", topology="u")
    with pytest.raises(ConfigError, match="--align-every is for feature-kl"):
        SimConfig(alignment="logit_kl", align_every=2)
    with pytest.raises(ConfigError, match="--align must be feature-kl or logit-kl, got 'kl'"):
        SimConfig(alignment="kl")


def test_serve_align_reaches_the_train_config_and_the_round_plan(tiny_model_dirs):
    assert train_config(build_parser().parse_args(SERVE)).alignment == "feature_kl"
    cfg = train_config(build_parser().parse_args([*SERVE, "--align", "logit-kl"]))
    assert cfg.alignment == "logit_kl"
    with pytest.raises(ConfigError, match="--align-top is for U-shaped clients, --align logit-kl for head/tail"):
        TrainConfig(alignment="logit_kl", align_top=True)

    from flexsfl.model.loading import load_model
    from flexsfl.server_backend.tail_host import TailHost

    host = TailHost(load_model(str(tiny_model_dirs["llama"]), num_labels=2))
    plan = make_strategy("flexpsfl", cfg).plan(0, "a", 2, host)
    assert plan.alignment == "logit_kl" and plan.align_lambda == cfg.align_lambda
    assert make_strategy("splitfed", cfg).plan(0, "a", 2, host).align_lambda == 0.0
    why = make_strategy("flexpsfl", cfg).refuse(1)
    assert "aligns at the logits (--align logit-kl)" in why and "\n" not in why
    assert make_strategy("flexpsfl", cfg).refuse(None) is None
    with pytest.raises(ConfigError, match="flexpsfl-u cannot align at the logits"):
        make_strategy("flexpsfl-u", cfg)


def test_the_clock_counts_z_ref_up_and_a_second_tail_pass():
    cost = ModelCost.from_config(read_model_config("minilm"), task="seq_cls", num_labels=2)
    p = EXAMPLE_PROFILES["rpi4"]
    kw = dict(batch=8, seq=48, align=True)
    feat, logit = split_client("c", cost, p, 2, **kw), split_client("c", cost, p, 2, alignment="logit_kl", **kw)
    z_up = 8 * 48 * cost.hidden_size * 4 * 8 / (p.uplink_mbps * 1e6)  # one more fp32 Z on the uplink, seconds
    assert logit.network_s - feat.network_s == pytest.approx(z_up, rel=1e-9)
    assert logit.compute_s == feat.compute_s and logit.server_flops == 2 * feat.server_flops
    off = dict(kw, align=False)  # λ = 0: nothing goes up, whatever the variant
    assert split_client("c", cost, p, 2, alignment="logit_kl", **off) == split_client("c", cost, p, 2, **off)


def test_benchmark_runs_use_logit_kl():
    from flexsfl.benchmarks.accuracy import RUNS
    from flexsfl.benchmarks.suites import SUITE_RUNS

    for name, lam in (("flexpsfl-logit", 0.1), ("flexpsfl-logit-l1", 1.0)):
        cfg = dataclasses.replace(SimConfig(), **RUNS[name])
        assert cfg.alignment == "logit_kl" and cfg.align_lambda == lam and cfg.strategy == "flexpsfl"
        assert name in SUITE_RUNS
    assert SUITE_RUNS.index("flexpsfl-logit") == SUITE_RUNS.index("flexpsfl-l1") + 1
    assert np.isclose(RUNS["flexpsfl-logit"]["align_lambda"], RUNS["flexpsfl"]["align_lambda"])


def test_benchmark_runs_sweep_the_alignment_at_the_top():
    from flexsfl.benchmarks.accuracy import RUNS
    from flexsfl.benchmarks.suites import SUITE_RUNS

    for name, lam in (("flexpsfl-u-top", 0.1), ("flexpsfl-u-top-l1", 1.0)):
        cfg = dataclasses.replace(SimConfig(), **RUNS[name])  # a valid config: --align-top needs U and λ > 0
        assert cfg.align_top and cfg.topology == "u" and cfg.strategy == "flexpsfl-u" and cfg.align_lambda == lam
        assert name in SUITE_RUNS
