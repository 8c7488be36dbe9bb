"""The wire and server benchmarks run end to end (real websockets, real processes) and produce
well-formed rows. Nothing here asserts on timings."""

import json

import pytest

from flexsfl.benchmarks.server import ServerBenchConfig, hot_functions, run_server_bench
from flexsfl.benchmarks.wire import WireConfig, run_wire
from flexsfl.core.errors import ConfigError


def test_wire_rows_per_encoding(tmp_path):
    cfg = WireConfig(batch=2, seq=8, hidden=16, reps=3, warmup=1, step_ms=10.0, out=str(tmp_path))
    rows, summary = run_wire(cfg)
    by = {r["encoding"]: r for r in rows}
    assert list(by) == ["fp32", "fp16", "bf16", "int8"]
    assert by["fp32"]["bytes_per_step"] > by["fp16"]["bytes_per_step"] == by["bf16"]["bytes_per_step"] > by["int8"]["bytes_per_step"]
    assert by["fp32"]["z_rel_err"] == 0.0 and by["fp32"]["g_rel_err"] == 0.0
    assert 0 < by["int8"]["g_rel_err"] < 0.05 and 0 < by["bf16"]["z_rel_err"] < 0.01
    for r in rows:
        assert r["rtt_n"] == 3 and r["rtt_ms_p50"] > 0 and r["codec_ms_p50"] > 0
        assert r["overhead_frac"] == pytest.approx(r["rtt_ms_p50"] / 10.0, abs=1e-4)
    assert json.loads((tmp_path / "wire.json").read_text())["rows"][0]["machine"]["arch"]
    assert (tmp_path / "wire.csv").exists() and "| fp32 |" in summary


def test_wire_takes_the_step_time_from_a_latency_result(tmp_path):
    (tmp_path / "latency.json").write_text(json.dumps({"rows": [
        {"backend": "torch", "split": 3, "batch": 2, "seq": 8, "threads": 1, "train_step_ms_p50": 5.0},
        {"backend": "ort", "split": 3, "batch": 2, "seq": 8, "threads": 1, "train_step_ms_p50": 20.0},
        {"backend": "ort", "split": 3, "batch": 8, "seq": 128, "threads": 1, "train_step_ms_p50": 1.0},
    ]}))
    rows, summary = run_wire(WireConfig(batch=2, seq=8, hidden=16, reps=2, warmup=0, encodings=("fp32",), out=str(tmp_path)))
    assert rows[0]["step_ms"] == 20.0 and "ort" in rows[0]["step_source"]
    with pytest.raises(ConfigError, match="no latency row"):
        run_wire(WireConfig(batch=4, seq=8, hidden=16, reps=1, encodings=("fp32",), out=str(tmp_path),
                            latency_json=str(tmp_path / "latency.json")))


def test_wire_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="--encodings"):
        WireConfig(encodings=("fp8",))
    with pytest.raises(ConfigError, match="--step-ms"):
        WireConfig(step_ms=0)


def test_server_bench_batched_and_per_request(tmp_path, tiny_model_dirs):
    cfg = ServerBenchConfig(model=str(tiny_model_dirs["gpt2"]), split=1, batch=2, seq=8, clients=(1, 2), local_steps=2,
                            rounds=2, repeats=1, out=str(tmp_path))
    rows, summary = run_server_bench(cfg)
    assert [(r["clients"], r["mode"]) for r in rows] == [(1, "batched"), (1, "per-request"), (2, "batched"), (2, "per-request")]
    for r in rows:
        assert r["repeats"] == 1 and r["steps_timed"] == r["clients"] * cfg.local_steps  # round 0 is the untimed warm-up
        assert r["steps_per_s_min"] == r["steps_per_s"] == r["steps_per_s_max"]
        assert r["steps_per_s"] > 0 and r["latency_ms_p50"] > 0 and r["batch_mean"] >= 1
        assert 0 <= r["g_frac_below_fp16_normal"] <= 1
    assert all(r["batch_mean"] == 1 for r in rows if r["mode"] == "per-request")
    assert all("speedup" in r and r["speedup_cpu"] > 0 for r in rows if r["mode"] == "batched")
    assert all(r["cpu_ms_per_step"] > 0 for r in rows)
    assert (tmp_path / "server.png").stat().st_size > 0 and (tmp_path / "server.csv").exists()
    assert "cross-client batching at 2 clients" in summary


def test_server_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="--rounds"):
        ServerBenchConfig(rounds=1)
    with pytest.raises(ConfigError, match="--modes"):
        ServerBenchConfig(modes=("fast",))
    with pytest.raises(ConfigError, match="--clients"):
        ServerBenchConfig(clients=(0,))
    with pytest.raises(ConfigError, match="--repeats"):
        ServerBenchConfig(repeats=0)


def test_hot_functions_from_collapsed_stacks(tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text(
        "thread (1): compute;run (a.py:1);train (a.py:2);forward (m.py:3) 6\n"
        "thread (1): compute;run (a.py:1);train (a.py:2);backward (m.py:9) 4\n"
        "thread (2): main;loop (b.py:1) 2\n"
    )
    hot = hot_functions(raw)
    compute = hot["thread (1): compute"]
    assert compute["samples"] == 10
    assert compute["self"] == [("forward", 0.6), ("backward", 0.4)]
    assert ("run", 1.0) not in compute["inclusive"] and ("forward", 0.6) in compute["inclusive"]
