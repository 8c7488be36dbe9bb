"""``flexsfl bench memory`` on a tiny real bundle: one fresh process per runtime, torch-free where a device is."""

from __future__ import annotations

import pytest

from flexsfl.benchmarks.memory import MemoryConfig, run_memory
from flexsfl.core.errors import ConfigError

pytest.importorskip("executorch")


@pytest.mark.slow
def test_executorch_rows_run_without_torch_and_hold_less_than_the_bindings(tiny_bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    bundle = tiny_bundles("gpt2", 1, "all")
    cfg = MemoryConfig(bundles=(str(bundle),), backends=("ort", "executorch", "executorch-bindings"), batch=8, seq=16,
                       warmup=1, steps=1, out=str(tmp_path / "out"))
    rows, text = run_memory(cfg)
    by = {r["backend"]: r for r in rows}
    assert list(by) == ["ort", "executorch", "executorch-bindings"]
    assert not by["ort"]["torch_loaded"] and not by["executorch"]["torch_loaded"]
    assert by["executorch-bindings"]["torch_loaded"]
    # the shim's process never maps libtorch: what the bindings' process holds on top of it is torch (~190 MB)
    assert by["executorch-bindings"]["runtime_mb"] - by["executorch"]["runtime_mb"] > 100
    assert by["executorch-bindings"]["peak_rss_mb"] > by["executorch"]["peak_rss_mb"]
    assert by["executorch"]["predicted_mb"] is not None and by["executorch-bindings"]["predicted_mb"] is None
    assert by["ort"]["vs_ort"] == 1.0 and "executorch-bindings" in text


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="choose from"):
        MemoryConfig(backends=("executorch-pybind",))
