"""Flags made from config dataclasses (:mod:`flexsfl.cli.config_args`): one source for each default."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from flexsfl.cli import build_parser
from flexsfl.cli.config_args import add_config_args, config_from_args, flag_name
from flexsfl.core.constants import OPTIMIZERS, TASKS, TRAIN_OPTIMIZER
from flexsfl.core.errors import ConfigError
from flexsfl.export.config import ExportConfig
from flexsfl.sim.config import DEMO, SimConfig


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = dataclasses.field(metadata={"help": "required: no default"})
    steps: int = dataclasses.field(default=3, metadata={"help": "how many"})
    mode: str = dataclasses.field(default="a", metadata={"help": "which", "choices": ("a", "b")})
    sizes: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"help": "comma-separated"})
    fast: bool = dataclasses.field(default=False, metadata={"help": "go fast"})
    checks: bool = dataclasses.field(default=True, metadata={"help": "skip checks"})
    hidden: int = dataclasses.field(default=7, metadata={"help": "not a flag", "cli": False})


def _toy(argv, base=None):
    p = argparse.ArgumentParser()
    add_config_args(p, Toy, base=base)
    return config_from_args(Toy, p.parse_args(argv), base=base)


def test_flags_take_type_default_choices_and_switches_from_the_fields():
    assert _toy(["--name", "x"]) == Toy(name="x")
    got = _toy(["--name", "x", "--steps", "5", "--mode", "b", "--sizes", "1, 2,3", "--fast", "--no-checks"])
    assert got == Toy(name="x", steps=5, mode="b", sizes=(1, 2, 3), fast=True, checks=False)
    with pytest.raises(SystemExit):
        _toy(["--name", "x", "--mode", "c"])  # not a choice
    with pytest.raises(SystemExit):
        _toy(["--steps", "2"])  # --name is required: the field has no default
    with pytest.raises(SystemExit):
        _toy(["--name", "x", "--hidden", "1"])  # cli=False: no flag


def test_with_a_base_only_the_given_flags_replace_its_values():
    base = Toy(name="base", steps=9, fast=True, checks=False)
    assert _toy([], base=base) == base
    assert _toy(["--steps", "1", "--no-checks"], base=base) == dataclasses.replace(base, steps=1)


def test_a_flag_needs_help_on_its_field():
    @dataclasses.dataclass
    class NoHelp:
        x: int = 1

    with pytest.raises(ValueError, match="NoHelp.x: a command-line field needs metadata"):
        add_config_args(argparse.ArgumentParser(), NoHelp)


def _export_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["export", "--model", "minilm", "--split", "2", "--out", "b", *extra])


def test_export_flags_build_the_same_config_as_its_defaults():
    assert config_from_args(ExportConfig, _export_args()) == ExportConfig(model="minilm", split=2, out="b")
    cfg = config_from_args(ExportConfig, _export_args("--lora-targets", "query,key", "--no-ort-training-artifacts",
                                                      "--tar", "--optimizer", "adamw", "--task", "causal_lm"))
    assert (cfg.lora_targets, cfg.ort_training_artifacts, cfg.tar, cfg.optimizer, cfg.task) == (
        ("query", "key"), False, True, "adamw", "causal_lm")


def test_every_export_field_but_force_has_a_flag():
    flags = {a.dest: a.option_strings for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions}
    for f in dataclasses.fields(ExportConfig):
        assert (f.name in flags) == (f.name != "force"), f.name
        if f.name in flags:
            assert flag_name(f) in flags[f.name]


def test_simulate_and_demo_keep_their_own_defaults():
    sim = build_parser().parse_args(["simulate"])
    demo = build_parser().parse_args(["demo", "--rounds", "2", "--no-batching"])
    assert config_from_args(SimConfig, sim, base=SimConfig()) == SimConfig()
    assert config_from_args(SimConfig, demo, base=DEMO) == dataclasses.replace(DEMO, rounds=2, batching=False)
    prof = build_parser().parse_args(["simulate", "--clients", "2", "--profiles", "rpi4, rpi5"])
    assert config_from_args(SimConfig, prof, base=SimConfig()).profiles == ("rpi4", "rpi5")


def test_optimizer_defaults_one_per_command_family():
    # Training a federation (serve, simulate, demo): TRAIN_OPTIMIZER; a bundle's own default: SGD.
    serve = build_parser().parse_args(["serve", "--model", "minilm", "--clients", "c.json", "--state-dir", "s"])
    assert serve.optimizer == SimConfig().optimizer == DEMO.optimizer == TRAIN_OPTIMIZER
    assert _export_args().optimizer == ExportConfig.optimizer == OPTIMIZERS[0] == "sgd"
    for argv in (["serve", "--help"], ["export", "--help"], ["simulate", "--help"], ["plan", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv[:1], "--optimizer", "rmsprop", *argv[1:]])
    assert TASKS == ("seq_cls", "causal_lm") and OPTIMIZERS == ("sgd", "adamw")


@pytest.mark.parametrize("kw, field", [
    ({"optimizer": "rmsprop"}, "optimizer"), ({"task": "mlm"}, "task"), ({"backend": "tflite"}, "backend"),
    ({"split": 0}, "split"), ({"lr": 0.0}, "lr"), ({"max_seq": 1}, "max_seq"),
])
def test_export_config_names_the_bad_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field} must"):
        ExportConfig(model="minilm", split=kw.pop("split", 2), out="b", **kw)


@pytest.mark.parametrize("kw, field", [
    ({"strategy": "fedprox"}, "strategy"), ({"partition": "zipf"}, "partition"), ({"encoding": "fp8"}, "encoding"),
    ({"rounds": 0}, "rounds"), ({"clients": 2, "profiles": ("rpi4",)}, "profiles"),
    ({"server_step_every": 0}, "server_step_every"),
])
def test_sim_config_names_the_bad_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field} (must|needs)"):
        SimConfig(**kw)
