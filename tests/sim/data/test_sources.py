"""flexsfl.sim.data.sources: the packaged data sets' published counts, the download cache, pip fetching."""

from __future__ import annotations

import os
import pathlib

import pytest

from flexsfl.core.errors import DataError
from flexsfl.sim import data as ds

from .conftest import VADER_DOMAIN_COUNTS


def test_vader_counts_match_the_published_numbers(vader):
    assert len(vader.examples) == 23_320
    assert vader.label_counts().tolist() == [10_849, 12_471]
    assert vader.label_names == ("negative", "positive")
    assert {g: tuple(c.tolist()) for g, c in vader.group_label_counts().items()} == VADER_DOMAIN_COUNTS
    assert vader.notes == {"dropped_neutral": 383, "html_unescaped": 236}
    assert not any("&amp;" in e.text for e in vader.examples)
    assert all(e.text == e.text.strip() and e.text for e in vader.examples)


def test_rotten_counts_match_the_published_numbers(rotten):
    assert len(rotten.examples) == 12_808
    assert rotten.label_counts().tolist() == [5_405, 7_403]  # rotten, fresh
    assert rotten.label_names == ("rotten", "fresh")
    sizes = [int(c.sum()) for c in rotten.group_label_counts().values()]
    assert len(sizes) == 508 and min(sizes) == 2 and max(sizes) == 35
    assert rotten.notes["dropped_plot"] == 1_097


def test_fetch_downloads_with_pip_and_replaces_a_corrupt_cache_file(tmp_path):
    bad = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    bad.write_bytes(b"truncated")
    path = ds.fetch_vader(tmp_path)
    assert path == bad and path.stat().st_size == 2_466_783
    assert sorted(os.listdir(tmp_path)) == ["vaderSentiment-3.3.2.tar.gz"]  # no download leftovers
    assert len(ds.parse_vader_sdist(path).examples) == 23_320


def test_fetch_failure_names_the_cause_and_the_exact_command(tmp_path, monkeypatch):
    # A pip that can reach no index at all: the same failure as a machine that is offline.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        ds.fetch_vader(cache)
    msg = str(info.value)
    assert msg.startswith("could not download the vaderSentiment 3.3.2 sdist (pip: ")
    assert "No matching distribution found for vaderSentiment==3.3.2" in msg
    assert f"-m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {cache}" in msg
    assert "\n" not in msg
    assert os.listdir(cache) == []


def test_cache_dir_follows_flexsfl_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path))
    assert ds.cache_dir() == tmp_path
    monkeypatch.delenv("FLEXSFL_CACHE")
    assert ds.cache_dir() == pathlib.Path.home() / ".cache" / "flexsfl"


def test_data_package_imports_without_torch_or_pandas():
    import subprocess
    import sys

    code = "import sys, flexsfl.sim.data, flexsfl.cli.data; assert not {'torch', 'pandas'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
