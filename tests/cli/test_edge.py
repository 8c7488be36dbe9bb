"""``flexsfl edge probe`` (:mod:`flexsfl.cli.edge`): help, a profile printed and written, a real head timed."""

from __future__ import annotations

import argparse
import json

import pytest

from flexsfl.cli.edge import add_parser
from flexsfl.core.errors import ConfigError
from flexsfl.core.profile import read_profile


@pytest.fixture(scope="module")
def ort_bundle(tiny_model_dirs, tmp_path_factory):
    """A real bundle with ONNX Runtime programs: the tiny Llama cut at split 2."""
    from flexsfl.core.bundle import load_bundle
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("probe") / "bundle"
    export_bundle(ExportConfig(model=str(tiny_model_dirs["llama"]), split=2, out=str(out), backend="ort", max_batch=4,
                               max_seq=32, ort_training_artifacts=False), progress=False)
    return load_bundle(out)



def _probe_cli(argv):
    parser = argparse.ArgumentParser(prog="flexsfl")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["edge", "probe", *argv])
    return args.func(args)


def test_probe_cli_help_renders(capsys):
    with pytest.raises(SystemExit) as e:
        _probe_cli(["--help"])
    assert e.value.code == 0 and "--memory-budget-mb" in capsys.readouterr().out


def test_probe_cli_prints_and_writes_the_profile(tmp_path, capsys):
    out = tmp_path / "me.json"
    assert _probe_cli(["--name", "here", "--uplink-mbps", "25", "--downlink-mbps", "80", "--rtt-ms", "12",
                       "--memory-budget-mb", "512", "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    p = read_profile(out)
    assert printed == p.to_json()
    assert (p.name, p.uplink_mbps, p.downlink_mbps, p.rtt_ms, p.memory_budget_mb) == ("here", 25.0, 80.0, 12.0, 512)


@pytest.mark.slow
def test_probe_cli_measures_the_bundles_head(ort_bundle, tmp_path, capsys):
    out = tmp_path / "me.json"
    assert _probe_cli(["--bundle", str(ort_bundle.root), "--backend", "ort", "--threads", "1", "--reps", "2",
                       "--json", str(out)]) == 0
    p = read_profile(out)
    assert json.loads(capsys.readouterr().out) == p.to_json()
    assert p.backend == "ort" and p.head_gflops > 0
    with pytest.raises(ConfigError, match=r"--batch/--seq must be within the bundle's limits \(batch <= 4"):
        _probe_cli(["--bundle", str(ort_bundle.root), "--batch", "5"])

