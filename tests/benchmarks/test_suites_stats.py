"""The suite statistics against hand-computed values: t-intervals over seeds, paired differences,
the verdicts and the table built from them."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from flexsfl.benchmarks.stats import Interval, paired_difference, t_interval, verdict
from flexsfl.benchmarks.suite_report import FLOOR, markdown, plot_suite, summarize
from flexsfl.benchmarks.suites import SUITES

T975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105}  # Student t, 0.975 quantile, by degrees of freedom


def test_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, se = 1/sqrt(3)
    assert iv.mean == pytest.approx(2.0) and iv.n == 3
    assert iv.half == pytest.approx(T975[2] / math.sqrt(3), rel=1e-9)  # 2.48414
    assert iv.low == pytest.approx(2.0 - 2.484138, abs=1e-6) and iv.high == pytest.approx(4.484138, abs=1e-6)
    five = t_interval([0.80, 0.82, 0.84, 0.86, 0.88])  # s = 0.0316228
    assert five.half == pytest.approx(T975[4] * 0.0316227766 / math.sqrt(5), rel=1e-8)  # 0.039265
    assert t_interval([0.7, None, 0.9]).half == pytest.approx(T975[1] * (0.2 / math.sqrt(2)) / math.sqrt(2), rel=1e-8)


def test_one_value_has_no_interval_and_none_is_an_error():
    iv = t_interval([0.75])
    assert (iv.mean, iv.half, iv.n, iv.low) == (0.75, None, 1, None)
    assert iv.format() == "0.750" and not iv.excludes_zero()
    with pytest.raises(ValueError):
        t_interval([])


def test_paired_difference_by_hand():
    a = {0: 0.90, 1: 0.80, 2: 0.85, 3: 0.99}
    b = {0: 0.80, 1: 0.75, 2: 0.85}  # seed 3 missing: not paired
    iv, diffs = paired_difference(a, b)
    assert diffs == pytest.approx({0: 0.10, 1: 0.05, 2: 0.0})
    # differences 0.10, 0.05, 0.00: mean 0.05, s = 0.05, se = 0.05/sqrt(3)
    assert iv.mean == pytest.approx(0.05) and iv.half == pytest.approx(T975[2] * 0.05 / math.sqrt(3), rel=1e-9)
    assert not iv.excludes_zero()  # 0.05 ± 0.124: a tie
    assert Interval(0.05, 0.01, 3).excludes_zero() and Interval(-0.05, 0.01, 3).excludes_zero()
    assert Interval(0.05, 0.124, 3).format(3, signed=True) == "+0.050 ± 0.124"
    assert paired_difference({0: 0.5}, {1: 0.5}) is None


def _rows():
    base = {"splits": "1,3", "global_acc": 0.8, "device_s": 100.0, "mb": 10.0, "eval_mb": 1.0, "train_s": 30.0,
            "unfit": []}
    acc = {"flexpsfl": [(0.90, 0.70, 0.85), (0.92, 0.72, 0.88), (0.94, 0.74, 0.86)],  # personal, generalization, floor
           "splitfed": [(0.80, 0.80, 0.84), (0.81, 0.81, 0.86), (0.83, 0.80, 0.85)]}
    return [{**base, "run": run, "seed": s, "personal_acc": p, "generalization_acc": g, "label_prior_acc": f}
            for run, vals in acc.items() for s, (p, g, f) in enumerate(vals)]


def test_summarize_and_the_table():
    report = summarize(_rows(), reference="flexpsfl")
    ref = report["intervals"]["flexpsfl"]["personal_acc"]
    assert ref["mean"] == pytest.approx(0.92) and ref["half"] == pytest.approx(T975[2] * 0.02 / math.sqrt(3))
    d = report["paired"]["splitfed"]["personal_acc"]  # 0.10, 0.11, 0.11
    assert d["per_seed"] == pytest.approx({0: 0.10, 1: 0.11, 2: 0.11})
    s = math.sqrt(((0.10 - 0.32 / 3) ** 2 + 2 * (0.11 - 0.32 / 3) ** 2) / 2)
    assert d["mean"] == pytest.approx(0.32 / 3) and d["half"] == pytest.approx(T975[2] * s / math.sqrt(3))
    g = report["paired"]["splitfed"]["generalization_acc"]  # -0.10, -0.09, -0.06
    assert g["mean"] == pytest.approx(-0.25 / 3)
    floor = report["paired"][FLOOR]["personal_acc"]  # 0.05, 0.04, 0.08
    assert floor["mean"] == pytest.approx(0.17 / 3)
    md = markdown(SUITES["supersense-a0.1"], _rows(), report)
    line = next(ln for ln in md.splitlines() if ln.startswith("| splitfed |") and "+0.107" in ln)
    assert line.split(" | ")[3] == "wins", line  # personal: the interval excludes 0
    assert line.split(" | ")[6].strip(" |") == "loses", line  # generalization: below 0 beyond the noise
    assert "| flexpsfl | 1,3 | 0.920 ± 0.050 |" in md
    assert "Seeds 0, 1, 2; 4 clients" in md


def test_a_fine_tuned_baseline_is_also_paired_as_its_plain_global_model():
    """SplitFed's personal accuracy is global + local fine-tune; its global model on each client's own split is
    the baseline without it, paired from the same run (and never for a strategy with personal models)."""
    rows = [{**r, "strategy": r["run"], "global_own_acc": g} for r, g in zip(_rows(), (0.5, 0.5, 0.5, 0.78, 0.80, 0.79))]
    report = summarize(rows, reference="flexpsfl")
    plain = report["paired"]["splitfed, global (no fine-tune)"]
    assert list(plain) == ["personal_acc"] and plain["personal_acc"]["per_seed"] == pytest.approx({0: 0.12, 1: 0.12, 2: 0.15})
    assert not any(k.startswith("flexpsfl,") for k in report["paired"])
    md = markdown(SUITES["supersense-a0.1"], rows, report)
    line = next(ln for ln in md.splitlines() if ln.startswith("| splitfed, global (no fine-tune) |"))
    assert "+0.130 ±" in line and line.split(" | ")[3] == "wins" and line.rstrip(" |").endswith("— | —"), line


def test_a_run_with_lost_client_metrics_is_left_out_of_client_side_means():
    rows = _rows()
    rows[3] = {**rows[3], "clients": 4, "clients_reported": 2, "personal_acc": 0.10, "device_s": 1.0}  # splitfed seed 0
    report = summarize(rows, reference="flexpsfl")
    sf = report["intervals"]["splitfed"]
    assert sf["personal_acc"]["n"] == 2 and sf["personal_acc"]["mean"] == pytest.approx(0.82)  # seeds 1, 2 only
    assert sf["device_s"]["mean"] == pytest.approx(100.0) and sf["generalization_acc"]["n"] == 3  # server-side: all
    assert report["paired"]["splitfed"]["personal_acc"]["per_seed"] == pytest.approx({1: 0.11, 2: 0.11})
    assert "splitfed seed 0 (2 of 4)" in markdown(SUITES["supersense-a0.1"], rows, report)


def test_a_run_with_a_client_left_out_of_an_aggregation_is_named():
    rows = _rows()
    rows[1] = {**rows[1], "dropped": {"1": ["c3"], "0": ["c1", "c2"]}}  # flexpsfl seed 1
    md = markdown(SUITES["supersense-a0.1"], rows, summarize(rows, reference="flexpsfl"))
    note = next(ln for ln in md.splitlines() if ln.startswith("Left out of an aggregation"))
    assert note.endswith(": flexpsfl seed 1 (round 0: c1, c2; round 1: c3).")
    assert "Left out of an aggregation" not in markdown(SUITES["supersense-a0.1"], _rows(), summarize(_rows(), "flexpsfl"))


def test_verdict_by_the_metric_direction():
    assert verdict(Interval(0.05, 0.01, 3)) == "wins" and verdict(Interval(-0.05, 0.01, 3)) == "loses"
    assert verdict(Interval(-5.0, 1.0, 3), lower_is_better=True) == "wins"  # the reference's perplexity is lower
    assert verdict(Interval(5.0, 1.0, 3), lower_is_better=True) == "loses"
    assert verdict(Interval(0.5, 1.0, 3), lower_is_better=True) == "tie" and verdict(Interval(1.0, None, 1)) == "—"


def _lm_rows(tmp_path):
    """Two runs × three seeds of a causal LM, each with a rounds.jsonl (last round scored, as eval_every 0)."""
    ppl = {"flexpsfl": [(100.0, 120.0), (102.0, 121.0), (104.0, 119.0)],  # personal, generalization
           "local": [(110.0, 150.0), (113.0, 149.0), (112.0, 152.0)]}
    rows = []
    for run, vals in ppl.items():
        for s, (p, g) in enumerate(vals):
            out = tmp_path / run / f"seed{s}"
            out.mkdir(parents=True)
            rounds = [{"round": 0, "device_s": 50.0, "elapsed_s": 5.0, "personal_ppl": None},
                      {"round": 1, "device_s": 100.0, "elapsed_s": 9.0, "personal_ppl": p}]
            (out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
            rows.append({"run": run, "seed": s, "task": "causal_lm", "splits": "1,4" if run == "flexpsfl" else "whole model",
                         "personal_ppl": p, "generalization_ppl": g, "global_ppl": 130.0, "pretrained_ppl": 180.0,
                         "personal_acc": 0.3, "generalization_acc": None, "label_prior_acc": None, "device_s": 100.0,
                         "mb": 5.0, "eval_mb": 1.0, "train_s": 60.0, "unfit": [], "out": str(out)})
    return rows


def test_a_perplexity_suite_lower_is_better_and_no_floor(tmp_path):
    rows = _lm_rows(tmp_path)
    report = summarize(rows, reference="flexpsfl")
    assert report["lower_is_better"] and FLOOR not in report["paired"]
    assert set(report["intervals"]["local"]) >= {"personal_ppl", "generalization_ppl", "global_ppl", "pretrained_ppl"}
    assert "personal_acc" not in report["intervals"]["local"]  # not the LM suite's measure
    d = report["paired"]["local"]["personal_ppl"]  # -10, -11, -8
    assert d["per_seed"] == pytest.approx({0: -10.0, 1: -11.0, 2: -8.0}) and d["mean"] == pytest.approx(-29 / 3)
    md = markdown(SUITES["lm"], rows, report, {"ditto": "its v_k never leaves the device"})
    line = next(ln for ln in md.splitlines() if ln.startswith("| local |") and "-9.67" in ln)
    assert line.split(" | ")[3] == "wins" and line.split(" | ")[6].strip(" |") == "wins", line  # lower ppl: a win
    assert f"| {FLOOR} | — | — | — | — | — | — |" in md and "a win is a lower perplexity" in md
    assert "| flexpsfl | 1,4 | 102.00 ± 4.97 |" in md and "Not run: ditto (its v_k never leaves the device)." in md
    assert "floor: global + prior" not in md and "test texts per client" in md
    png = plot_suite(SUITES["lm"], rows, tmp_path / "lm.png")
    assert png.stat().st_size > 10_000


def test_plateau_is_the_trend_of_the_runs_last_third(tmp_path):
    """The gain per 3 rounds of a least-squares line through the last third of the run (at least 4
    rounds): a steady rise of 0.004 a round (0.012 per 3) is "still rising"; a flat 30-round run whose
    last 10 rounds scatter ±0.02 by sampling noise is a plateau, though its last round is 0.04 above the
    one 3 before it; a rise before the window does not count; too few rounds have no verdict."""
    from flexsfl.benchmarks.suite_report import plateau

    scatter = [1, -1, 1, -1, 1, 1, -1, 1, -1, 1]  # symmetric about its middle: a least-squares slope of 0
    curves = {"rising": [0.4 + 0.05 * k for k in range(5)], "slow": [0.7 + 0.004 * k for k in range(12)],
              "noisy": [0.8] * 20 + [0.8 + 0.02 * e for e in scatter],
              "late": [0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.78, 0.79, 0.8] + [0.8] * 5,  # 14 rounds: the last 5 flat
              "short": [0.5, 0.6]}
    assert curves["noisy"][-1] - curves["noisy"][-4] == pytest.approx(0.04)
    rows = []
    for run, ys in curves.items():
        for seed, shift in enumerate((0.0, 0.01)):
            out = tmp_path / run / f"seed{seed}"
            out.mkdir(parents=True)
            (out / "rounds.jsonl").write_text("".join(json.dumps({"round": k, "personal_acc": y + shift}) + "\n"
                                                      for k, y in enumerate(ys)))
            rows.append({"run": run, "seed": seed, "out": str(out), "clients": 4, "clients_reported": 4, "splits": "1,5",
                         "personal_acc": ys[-1] + shift})
    got = {run: plateau(rows, run) for run in curves}
    assert got["rising"]["gain"] == pytest.approx(0.15) and not got["rising"]["plateau"]
    assert got["slow"]["per_seed"] == pytest.approx({0: 0.012, 1: 0.012}) and not got["slow"]["plateau"]
    assert got["noisy"]["gain"] == pytest.approx(0.0, abs=1e-12) and got["noisy"]["plateau"]
    assert got["late"]["gain"] == pytest.approx(0.0, abs=1e-12) and got["late"]["plateau"]
    assert got["short"] is None
    report = summarize([r for r in rows if r["run"] != "short"], reference="rising")
    assert set(report["plateau"]) == {"rising", "slow", "noisy", "late"}
    md = markdown(SUITES["supersense-a0.1"], rows, report)
    assert "rising +0.150 (+0.150, +0.150) (still rising)" in md and "slow +0.012 (+0.012, +0.012) (still rising)" in md
    assert "at the trend of the run's last third" in md


def test_plateau_needs_every_seed_and_reads_rounds_scored_every_nth(tmp_path):
    """Devices that score every 4th round (``--score-every 4`` of 16: rounds 3, 7, 11, 15) are measured
    on the scored rounds of the last third (6 rounds: 11 and 15), as the relative fall of perplexity; a
    run is at a plateau only when every seed is: one still falling 3 % per 3 rounds beside one rising
    as fast averages 0 and is not."""
    from flexsfl.benchmarks.suite_report import plateau

    def run(name, seed, ppl):  # round -> the devices' mean personal perplexity, where they scored
        out = tmp_path / name / f"seed{seed}"
        out.mkdir(parents=True)
        (out / "rounds.jsonl").write_text("".join(
            json.dumps({"round": k, "task": "causal_lm", "personal_ppl": ppl.get(k)}) + "\n" for k in range(16)))
        return {"run": name, "seed": seed, "out": str(out), "clients": 4, "clients_reported": 4, "task": "causal_lm"}

    got = plateau([run("falling", 0, {3: 150.0, 7: 120.0, 11: 110.0, 15: 100.0})], "falling")  # -2.5 a round, mean 105
    assert got["per_seed"] == {0: pytest.approx(3 * 2.5 / 105.0)} and not got["plateau"]
    got = plateau([run("flat", 0, {3: 150.0, 7: 120.0, 11: 100.0, 15: 99.5})], "flat")  # 120 is outside the window
    assert got["per_seed"] == {0: pytest.approx(3 * 0.125 / 99.75)} and got["plateau"]
    rows = [run("split", 0, {3: 150.0, 7: 104.0, 11: 100.0, 15: 96.0}), run("split", 1, {3: 150.0, 7: 96.0, 11: 100.0, 15: 104.0})]
    got = plateau(rows, "split")
    assert got["per_seed"] == {0: pytest.approx(3 / 98), 1: pytest.approx(-3 / 102)} and got["gain"] == pytest.approx(0.0, abs=1e-3)
    assert not got["plateau"]
