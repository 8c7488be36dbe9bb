"""Accuracy-aware split choice (:mod:`flexsfl.core.calibration`): calibrations from simulate summaries and
files, the utility trade-off by hand, W = 0 keeps the planner's choice, bad calibrations are one-line errors."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from flexsfl.core.calibration import Calibration, CalibrationPoint, read_calibration, trade_off
from flexsfl.core.errors import ConfigError
from flexsfl.core.planner import choose_split
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.core.u_planner import choose_u_split


def write_summary(path: pathlib.Path, clients: list[tuple[int, int | None, float]], *, model: str = "minilm",
                  strategy: str = "flexpsfl", topology: str = "head-tail") -> pathlib.Path:
    """A `flexsfl simulate` summary.json with the fields the calibration reads (flexsfl.sim.results.collect
    writes them): the config's model, task, strategy and topology; per client its split, its choice
    (with the top for U), its personal and generalization accuracy."""
    path.mkdir(parents=True, exist_ok=True)
    per_client = [{"client": f"c{k}", "split": s, "choice": {"split": s, **({"top": t} if t is not None else {})},
                   "personal_acc": acc, "generalization_acc": acc - 0.1} for k, (s, t, acc) in enumerate(clients)]
    summary = {"config": {"model": model, "task": "seq_cls", "strategy": strategy, "topology": topology},
               "final": {}, "per_client": per_client}
    (path / "summary.json").write_text(json.dumps(summary))
    return path / "summary.json"


def test_a_directory_of_runs_averages_each_layout_over_clients_and_runs(tmp_path):
    write_summary(tmp_path / "s1", [(1, None, 0.70), (1, None, 0.74)])
    write_summary(tmp_path / "s3", [(3, None, 0.80), (3, None, 0.82)])
    write_summary(tmp_path / "s3-seed1", [(3, None, 0.84)])
    write_summary(tmp_path / "u", [(1, 1, 0.90), (1, 1, 0.88)], strategy="flexpsfl-u", topology="u")
    cal = read_calibration(tmp_path)
    assert (cal.model, cal.task, cal.metric, len(cal.sources)) == ("minilm", "seq_cls", "personal_acc", 4)
    assert cal.accuracy(1, None) == pytest.approx(0.72) and cal.accuracy(3, None) == pytest.approx(0.82)
    assert cal.accuracy(1, 1) == pytest.approx(0.89) and cal.accuracy(2, None) is None
    p3 = next(p for p in cal.points if p.layout == (3, None))
    assert (p3.clients, p3.runs) == (3, 2)
    assert read_calibration(tmp_path, "generalization_acc").accuracy(1, None) == pytest.approx(0.62)
    # a calibration file round-trips
    f = tmp_path / "cal.json"
    f.write_text(json.dumps(cal.to_json()))
    assert read_calibration(f) == cal


@pytest.fixture(scope="module")
def rpi5_choice(minilm_cost):
    # rpi5: faster than its share of the server, budget 280 MB: the fastest split that fits is 3
    return choose_split(minilm_cost, EXAMPLE_PROFILES["rpi5"], batch=8, seq=128)


def test_weight_zero_keeps_the_planners_choice(rpi5_choice):
    cal = Calibration((CalibrationPoint(1, None, 0.95), CalibrationPoint(3, None, 0.70)))
    to = trade_off(rpi5_choice.estimates, (rpi5_choice.split, None), cal, 0.0)
    assert (to.split, to.top, to.changed) == (rpi5_choice.split, None, False) == (3, None, False)
    assert [r.accuracy for r in to.rows] == [0.95, None, 0.70, None, None]


def test_a_large_enough_accuracy_weight_picks_the_more_accurate_split_by_hand(minilm_cost):
    """A slow device (rpi4) keeps split 1 for speed; the calibration says split 3 is 5 points more accurate."""
    choice = choose_split(minilm_cost, EXAMPLE_PROFILES["rpi4"], batch=8, seq=48)
    assert choice.split == 1
    t = {e.split: e.time_s for e in choice.estimates}
    cal = Calibration((CalibrationPoint(1, None, 0.80), CalibrationPoint(3, None, 0.85)))
    # utility(s) = W · acc(s) − t(s) / t(1): split 3 wins once W · 0.05 > t(3) / t(1) − 1
    threshold = (t[3] / t[1] - 1) / 0.05
    assert 1 < threshold < 100  # split 3 is slower, but not absurdly
    below = trade_off(choice.estimates, (1, None), cal, 0.9 * threshold)
    above = trade_off(choice.estimates, (1, None), cal, 1.1 * threshold)
    assert (below.split, below.changed) == (1, False) and (above.split, above.changed) == (3, True)
    r3 = next(r for r in above.rows if r.split == 3)
    assert r3.utility == pytest.approx(1.1 * threshold * 0.85 - t[3] / t[1])
    assert "reaches 0.850" in above.reason and "the planner's choice, split 1, reaches 0.800" in above.reason
    # a split that does not fit is never chosen, however accurate; an uncalibrated one never, however fast
    mem = {e.split: e.memory_mb for e in choice.estimates}
    tight = dataclasses.replace(EXAMPLE_PROFILES["rpi4"], head_gflops=100.0, memory_budget_mb=int((mem[3] + mem[4]) / 2))
    fast = choose_split(minilm_cost, tight, batch=8, seq=48)
    assert fast.split == 3  # the fastest that fits for a fast device
    cal = Calibration((CalibrationPoint(1, None, 0.80), CalibrationPoint(2, None, 0.81), CalibrationPoint(5, None, 0.99)))
    to = trade_off(fast.estimates, (3, None), cal, 1e6)
    assert to.split == 2 and next(r for r in to.rows if r.split == 5).utility is None


def test_u_layouts_trade_off_with_pins(minilm_cost):
    p = EXAMPLE_PROFILES["jetson-orin"]
    choice = choose_u_split(minilm_cost, p, batch=8, seq=48)
    cal = Calibration((CalibrationPoint(1, 0, 0.70), CalibrationPoint(2, 2, 0.90), CalibrationPoint(3, 1, 0.95)))
    to = trade_off(choice.estimates, (choice.split, choice.top), cal, 1000.0)
    assert (to.split, to.top) == (3, 1)  # the most accurate, as accuracy dominates
    allowed = {(e.split, e.top) for e in choice.estimates if e.split == 2}  # the user pinned split 2
    to = trade_off(choice.estimates, (choice.split, choice.top), cal, 1000.0, allowed=allowed)
    assert (to.split, to.top) == (2, 2)


def test_bad_calibrations_are_one_line_errors(tmp_path, rpi5_choice):
    def refused(path, match):
        with pytest.raises(ConfigError, match=match) as e:
            read_calibration(path)
        assert "\n" not in str(e.value)

    refused(tmp_path / "missing.json", "no such calibration file or directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no summary.json below it")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused(bad, r"bad.json: not valid JSON \(line 1")
    bad.write_text(json.dumps({"schema": 1, "points": [{"split": 2, "top": None, "accuracy": 1.7}]}))
    refused(bad, r"points\[0\]: calibration point \(2, None\): accuracy must be a number in 0\.\.1, got 1\.7")
    bad.write_text(json.dumps({"schema": 1, "points": [{"split": 2, "accuracy": 0.5}, {"split": 2, "accuracy": 0.6}]}))
    refused(bad, "lists a .split, top. layout twice")
    bad.write_text(json.dumps([1, 2]))
    refused(bad, "not a calibration file")
    write_summary(tmp_path / "runs" / "a", [(1, None, 0.7)])
    write_summary(tmp_path / "runs" / "b", [(3, None, 0.8)], model="smollm2")
    refused(tmp_path / "runs", r"a run of model 'smollm2', but .* is of 'minilm'; calibrate with runs of one model")
    refused(write_summary(tmp_path / "fedavg", [(1, None, 0.7)], strategy="fedavg"), "a 'fedavg' run; calibrate with FlexP-SFL")
    lm = write_summary(tmp_path / "lm", [(1, None, 0.7)])
    lm.write_text(lm.read_text().replace('"personal_acc": 0.7', '"personal_acc": null'))
    refused(lm, "client 'c0' has no personal_acc")
    cal = Calibration((CalibrationPoint(5, 2, 0.9),))
    with pytest.raises(ConfigError, match=r"no fitting layout here has a calibrated accuracy \(the calibration has \(5, 2\)\)"):
        trade_off(rpi5_choice.estimates, (3, None), cal, 1.0)
    with pytest.raises(ConfigError, match="--accuracy-weight must be a number >= 0"):
        trade_off(rpi5_choice.estimates, (3, None), cal, -1.0)
