"""``flexsfl bench ...`` parsers and handlers (:mod:`flexsfl.cli.bench`)."""

import argparse

import pytest

from flexsfl.cli.bench import add_parser
from flexsfl.core.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexsfl")
    add_parser(p.add_subparsers(dest="command"))
    return p


def test_bench_wire_prints_the_summary_and_the_machine(tmp_path, capsys):
    args = _parser().parse_args(["bench", "wire", "--batch", "2", "--seq", "8", "--hidden", "16", "--reps", "2", "--warmup", "0",
                                 "--encodings", "fp32,int8", "--step-ms", "5", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "| int8 |" in out and "machine:" in out and "commit" in out
    assert (tmp_path / "wire.json").exists()


@pytest.mark.parametrize("argv, match", [
    (["bench", "server", "--clients", "1,x"], "--clients must be comma-separated integers"),
    (["bench", "latency", "--model", "minilm", "--splits", "1,,2"], "--splits must be comma-separated integers"),
    (["bench", "latency", "--model", "minilm", "--backend", "tflite"], "--backend tflite"),
    (["bench", "wire", "--encodings", "fp8"], "--encodings fp8"),
    (["bench", "accuracy", "--strategies", "flexpsfl,fedprox"], "unknown fedprox"),
])
def test_bad_arguments_are_config_errors(argv, match):
    args = _parser().parse_args(argv)
    with pytest.raises(ConfigError, match=match):
        args.func(args)


@pytest.mark.parametrize("name, flag", [("latency", "--backend"), ("server", "--clients"), ("wire", "--encodings"),
                                        ("accuracy", "--strategies")])
def test_flexsfl_command_has_every_benchmark_with_its_own_flags(name, flag, capsys):
    from flexsfl.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: flexsfl bench {name}") and flag in out


@pytest.mark.parametrize("argv, run_name, settings", [
    (["bench", "latency", "--model", "minilm", "--splits", "2,3", "--backend", "ort", "--reps", "4", "--threads", "1"],
     "run_latency", {"model": "minilm", "splits": (2, 3), "backends": ("ort",), "reps": 4, "threads": 1}),
    (["bench", "server", "--clients", "1,2", "--split", "2", "--rounds", "3", "--modes", "batched"],
     "run_server_bench", {"clients": (1, 2), "split": 2, "rounds": 3, "modes": ("batched",)}),
    (["bench", "wire", "--encodings", "fp32,int8", "--reps", "5", "--hidden", "16"],
     "run_wire", {"encodings": ("fp32", "int8"), "reps": 5, "hidden": 16}),
    (["bench", "accuracy", "--strategies", "flexpsfl,local", "--rounds", "2", "--local-steps", "3"],
     "run_accuracy", {"strategies": "flexpsfl,local", "rounds": 2, "local_steps": 3}),
])
def test_each_command_runs_its_benchmark_with_the_parsed_settings(argv, run_name, settings, monkeypatch, capsys):
    import importlib

    from flexsfl.cli import bench, build_parser

    name = argv[1]
    module = importlib.import_module(f"flexsfl.benchmarks.{name}")
    mod, run, text = bench.BENCHMARKS[name]
    assert mod is module and run is getattr(module, run_name)  # `bench NAME` is bound to that benchmark
    # Stand in for the (minutes-long) run itself, to see what the command hands it.
    seen = []
    monkeypatch.setitem(bench.BENCHMARKS, name, (mod, lambda cfg: (seen.append(cfg), ([], f"| summary of {name} |"))[1], text))
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    (cfg,) = seen
    assert {k: getattr(cfg, k) for k in settings} == settings
    assert f"| summary of {name} |" in capsys.readouterr().out
