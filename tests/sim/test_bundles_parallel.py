"""A run's missing bundles export side by side in their own processes; cached ones are reused."""

from __future__ import annotations

import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import FlexSFLError
from flexsfl.export.config import ExportConfig
from flexsfl.sim.bundles import export_missing


def _job(model_dir, out, split):
    return out, ExportConfig(model=str(model_dir), split=split, out=str(out), backend="ort", num_labels=2, max_batch=4,
                             max_seq=16, ort_training_artifacts=False)


@pytest.mark.slow
def test_two_bundles_export_in_parallel_then_come_from_the_cache(tiny_model_dirs, tmp_path):
    jobs = [_job(tiny_model_dirs["gpt2"], tmp_path / f"s{s}", s) for s in (1, 2)]
    started = []
    assert export_missing(jobs, workers=2, on_start=started.append) == [tmp_path / "s1", tmp_path / "s2"]
    assert started == [[tmp_path / "s1", tmp_path / "s2"]]
    assert [load_bundle(p).manifest.split for p, _ in jobs] == [1, 2]
    mtime = (tmp_path / "s1" / "manifest.json").stat().st_mtime_ns
    assert export_missing(jobs, workers=2, on_start=started.append) == []  # all cached: nothing exported
    assert len(started) == 1 and (tmp_path / "s1" / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_failed_export_names_its_bundle(tiny_model_dirs, tmp_path):
    jobs = [_job(tiny_model_dirs["gpt2"], tmp_path / "ok", 1), _job(tiny_model_dirs["gpt2"], tmp_path / "bad", 99)]
    with pytest.raises(FlexSFLError, match="bad"):
        export_missing(jobs, workers=2)


def test_a_job_must_write_where_it_says(tiny_model_dirs, tmp_path):
    path, config = _job(tiny_model_dirs["gpt2"], tmp_path / "a", 1)
    with pytest.raises(ValueError, match="writes to"):
        export_missing([(tmp_path / "b", config)])
