"""``--align-top`` on the command line: ``flexsfl simulate/demo --align-top`` (SimConfig, which the
simulation hands to the server's TrainConfig) and ``flexsfl serve --align-top``, each refused in one
line where the term has nothing to act on (no U-shaped top, or λ = 0)."""

from __future__ import annotations

import dataclasses

import pytest

from flexsfl.cli.config_args import config_from_args
from flexsfl.cli.main import build_parser
from flexsfl.cli.serve import train_config
from flexsfl.core.errors import ConfigError
from flexsfl.sim.config import DEMO, SimConfig


@pytest.mark.parametrize("cmd, base", [("simulate", SimConfig()), ("demo", DEMO)])
def test_simulate_and_demo_take_align_top(cmd, base):
    args = build_parser().parse_args([cmd, "--topology", "u", "--align-top"])
    cfg = config_from_args(SimConfig, args, base=base)
    assert cfg.align_top is True and cfg.topology == "u" and cfg.strategy == "flexpsfl-u"
    assert config_from_args(SimConfig, build_parser().parse_args([cmd]), base=base).align_top is False


def test_sim_config_refuses_align_top_without_a_top_or_lambda():
    with pytest.raises(ConfigError, match="--align-top .* add --topology u and --align-lambda > 0"):
        SimConfig(align_top=True)
    with pytest.raises(ConfigError, match="--align-top .* add --topology u and --align-lambda > 0"):
        SimConfig(topology="u", align_lambda=0.0, align_top=True)
    assert dataclasses.replace(DEMO, topology="u", align_top=True).align_top


SERVE = ["serve", "--model", "minilm", "--clients", "clients.json", "--state-dir", "state"]


def test_serve_align_top_reaches_the_train_config():
    assert train_config(build_parser().parse_args([*SERVE, "--align-top", "--align-lambda", "0.2"])).align_top is True
    assert train_config(build_parser().parse_args(SERVE)).align_top is False
    with pytest.raises(ConfigError, match="align_top .* set align_lambda > 0 too"):
        train_config(build_parser().parse_args([*SERVE, "--align-top", "--align-lambda", "0"]))
