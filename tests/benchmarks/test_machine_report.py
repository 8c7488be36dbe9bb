"""Machine description, GEMM peak, the worker processes and the result files."""

import csv
import json

import pytest

from flexsfl.benchmarks.machine import gemm_peak, machine_info, measure_gemm_peak
from flexsfl.benchmarks.report import markdown_table, summarize, write_results
from flexsfl.benchmarks.worker import Worker
from flexsfl.core.errors import BackendError


def test_machine_info_names_the_device_libraries_and_commit():
    m = machine_info()
    for key in ("cpu", "cores", "usable_cores", "memory_mb", "arch", "board", "raspberry_pi", "jetson", "versions", "commit",
                "load_avg"):
        assert key in m, key
    assert m["cores"] >= 1 and m["memory_mb"] > 0 and m["arch"]
    assert m["versions"]["numpy"] and m["commit"] != ""
    assert isinstance(m["raspberry_pi"], bool) and isinstance(m["jetson"], bool)


def test_gemm_peak_measures_every_size_and_takes_the_best():
    r = gemm_peak(sizes=(32, 64), reps=2)
    rates = [v for lib in r["gflops"].values() for v in lib.values()]
    assert set(r["gflops"]["numpy"]) == {"32", "64"}
    assert r["peak_gflops"] == max(rates) > 0


def test_gemm_peak_in_a_single_threaded_worker_process():
    r = measure_gemm_peak(1, sizes=(64,), reps=1, times=2)
    assert r["threads"] == 1 and r["peak_gflops"] > 0


def test_worker_failure_is_a_backend_error_naming_the_worker_and_keeps_its_log(tmp_path):
    with Worker("flexsfl.benchmarks.machine:gemm_worker", name="bad-gemm", log_dir=tmp_path) as w:
        with pytest.raises(BackendError, match="bad-gemm failed: ValueError"):
            w.request({"sizes": [-3], "reps": 1}, timeout=60)
    assert "Traceback" in w.log_path.read_text()


def test_a_clean_worker_leaves_no_log(tmp_path):
    measure_gemm_peak(1, sizes=(16,), reps=1, log_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_worker_with_an_unknown_target_fails_cleanly(tmp_path):
    with Worker("flexsfl.benchmarks.machine:no_such_worker", log_dir=tmp_path) as w:
        with pytest.raises(BackendError, match="AttributeError"):
            w.recv(timeout=60)


def test_summarize_gives_percentiles_in_ms():
    s = summarize([0.001 * i for i in range(1, 11)], "step")
    assert s["step_n"] == 10 and s["step_ms_min"] == 1.0
    assert s["step_ms_p50"] == pytest.approx(5.5) and s["step_ms_p90"] == pytest.approx(9.1)
    with pytest.raises(ValueError):
        summarize([], "step")


def test_results_carry_the_machine_in_every_row(tmp_path):
    m = machine_info()
    rows = [{"backend": "ort", "train_step_ms_p50": 12.5, "extra": {"nested": 1}}, {"backend": "torch", "train_step_ms_p50": 10.0}]
    paths = write_results(tmp_path / "out", "demo", rows, m, meta={"reps": 3}, json_path=tmp_path / "copy.json")
    doc = json.loads(paths["json"].read_text())
    assert doc["meta"] == {"reps": 3} and len(doc["rows"]) == 2
    assert all(r["machine"]["commit"] == m["commit"] for r in doc["rows"])
    assert json.loads((tmp_path / "copy.json").read_text()) == doc
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert [r["backend"] for r in got] == ["ort", "torch"]
    assert got[0]["commit"] == m["commit"] and got[0]["machine_cpu"] == m["cpu"] and "extra" not in got[0]


def test_markdown_table_formats_and_marks_missing_values():
    t = markdown_table([{"a": 1.23456, "b": None}], [("a", "A", ".2f"), ("b", "B", "d")])
    assert t.splitlines() == ["| A | B |", "|---|---|", "| 1.23 | - |"]
