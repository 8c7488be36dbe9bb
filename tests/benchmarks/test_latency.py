"""The latency benchmark runs every backend in its own process and produces well-formed rows
(a tiny random GPT-2 bundle; no timing assertions)."""

import json

import pytest

from flexsfl.benchmarks.latency import LatencyConfig, export_cached, run_latency
from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError


@pytest.fixture
def tiny_bundle(tiny_bundles):
    """The session's shared two-backend GPT-2 bundle (split 1; batch <= 8, seq <= 48)."""
    return tiny_bundles("gpt2", 1, "all")


def _check_rows(rows, backends, tmp_path, summary):
    assert [r["backend"] for r in rows] == list(backends)
    need = ("backend", "split", "batch", "seq", "threads", "forward_ms_p50", "train_step_ms_p50", "train_step_ms_p90",
            "peak_rss_mb", "bytes_per_step")
    for r in rows:
        assert all(r.get(k) is not None for k in need), r
        assert (r["split"], r["batch"], r["seq"], r["threads"]) == (1, 2, 8, 1)
        assert r["train_step_n"] == 4 and r["forward_ms_p50"] > 0 and r["train_step_ms_p90"] >= r["train_step_ms_p50"]
        assert r["peak_rss_mb"] > 10
        assert r["bytes_per_step"] > 2 * 2 * 8 * 64 * 4  # Z and g in fp32, plus headers, mask, labels
        assert r["flops_forward"] > 0 and r["flops_backward"] > 0 and 0 < r["frac_of_peak"]
        assert (r["artifact_mb"] is None) == (r["backend"] == "torch")
    assert rows[0]["vs_torch"] == 1.0
    doc = json.loads((tmp_path / "latency.json").read_text())
    assert doc["meta"]["gemm_peak_1thread"]["peak_gflops"] > 0 and doc["rows"][0]["machine"]["commit"]
    assert "| torch |" in summary


@pytest.mark.slow  # three backends timed (~40 s); CI keeps the refusals below
def test_latency_rows_for_every_backend(tiny_bundle, tmp_path):
    cfg = LatencyConfig(bundle=str(tiny_bundle), batch=(2,), seq=(8,), reps=4, rounds=2, warmup=1, out=str(tmp_path),
                        json=str(tmp_path / "extra.json"))
    rows, summary = run_latency(cfg)
    _check_rows(rows, ("torch", "ort", "executorch"), tmp_path, summary)
    assert json.loads((tmp_path / "extra.json").read_text()) == json.loads((tmp_path / "latency.json").read_text())


@pytest.mark.slow
def test_latency_sweep_exports_into_the_cache_once(tiny_model_dirs, tmp_path):
    model, cache = str(tiny_model_dirs["gpt2"]), tmp_path / "cache"
    cfg = LatencyConfig(model=model, splits=(1,), backends=("torch", "ort"), batch=(2,), seq=(8,), reps=4, rounds=2, warmup=1,
                        out=str(tmp_path), cache=str(cache))
    rows, summary = run_latency(cfg)
    _check_rows(rows, ("torch", "ort"), tmp_path, summary)
    assert rows[1]["export_s"] > 0 and rows[0]["export_s"] > 0
    (exported,) = cache.iterdir()
    assert load_bundle(exported).manifest.backend == ("ort",)
    assert export_cached(model, 1, max_batch=32, max_seq=128, cache=cache, backend="ort") == exported  # reused


def test_latency_refuses_what_the_bundle_cannot_do(tiny_bundles, tmp_path):
    ort_only = str(tiny_bundles("gpt2", 1, "ort"))
    with pytest.raises(ConfigError, match="exceed bundle"):
        run_latency(LatencyConfig(bundle=ort_only, backends=("ort",), batch=(16,), seq=(8,), out=str(tmp_path)))
    with pytest.raises(ConfigError, match="has no executorch programs"):
        run_latency(LatencyConfig(bundle=ort_only, batch=(2,), seq=(8,), out=str(tmp_path)))


def test_latency_config_needs_one_bundle_or_one_model():
    with pytest.raises(ConfigError, match="either --bundle"):
        LatencyConfig()
    with pytest.raises(ConfigError, match="either --bundle"):
        LatencyConfig(bundle="b", model="minilm")
    with pytest.raises(ConfigError, match="--backend"):
        LatencyConfig(model="minilm", backends=("tflite",))
