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


def test_two_processes_sharing_the_cache_export_a_bundle_once(tiny_model_dirs, tmp_path):
    """Two simulations start at once and need the same bundle: one exports it, the other waits and
    reuses it (they used to both export, the later one replacing the directory under the earlier
    one's clients: "sha256 mismatch (tampered with or truncated)")."""
    import subprocess
    import sys

    out = tmp_path / "cache" / "s1"
    code = ("import sys; from flexsfl.export.config import ExportConfig; from flexsfl.sim.bundles import export_cached; "
            f"print('exported' if export_cached(ExportConfig(model={str(tiny_model_dirs['gpt2'])!r}, split=1, "
            f"out={str(out)!r}, backend='ort', num_labels=2, max_batch=4, max_seq=16, ort_training_artifacts=False)) "
            "else 'reused')")
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    said = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        said.append(stdout.strip().splitlines()[-1])
    assert sorted(said) == ["exported", "reused"]
    assert load_bundle(out).manifest.split == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [".s1.lock", "s1"]  # no stage left behind
