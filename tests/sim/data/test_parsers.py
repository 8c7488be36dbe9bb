"""flexsfl.sim.data.parsers: odd lines counted, wrong archives refused."""

from __future__ import annotations

import io
import tarfile

import pytest

from flexsfl.edge_runtime.data import Example
from flexsfl.core.errors import DataError
from flexsfl.sim import data as ds


def _sdist(path, files: dict[str, bytes]):
    """A vaderSentiment-shaped sdist: outer tar.gz holding additional_resources/hutto_ICWSM_2014.tar.gz."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_vader_parser_counts_odd_lines_instead_of_crashing(tmp_path):
    tweets = (
        b"1\t2.5\tgreat day &amp; night\r\n"
        b"2\t-1.0\tbad\r\n"
        b"3\t0\tneutral\r\n"
        b"4\tnot-a-number\ttext\r\n"
        b"5\tnan\ttext\r\n"
        b"6\t1.0\n"  # two fields
        b"7\t1.0\ta\ttab inside\n"  # four fields
        b"8\t1.5\t   \n"
        b"\r\n"
        b"9\t-0.5\tcaf\xe9 in cp1252\n"
    )
    files = {"tweets_GroundTruth.txt": tweets}
    files |= {f"{stem}_GroundTruth.txt": b"1\t1.0\tfine\n" for stem in list(ds.VADER_DOMAINS)[1:]}
    d = ds.parse_vader_sdist(_sdist(tmp_path / "v.tar.gz", files))
    assert d.examples[:3] == (Example("great day & night", 1), Example("bad", 0), Example("café in cp1252", 0))
    assert d.groups == ("tweets",) * 3 + ("movie_reviews", "amazon_reviews", "nyt_editorials")
    assert d.notes == {
        "html_unescaped": 1,
        "dropped_neutral": 1,
        "skipped_bad_score": 2,
        "skipped_bad_fields": 2,
        "skipped_empty_text": 1,
        "non_utf8_lines": 1,
    }


def test_vader_parser_rejects_wrong_archives(tmp_path):
    with pytest.raises(DataError, match=r"no tweets_GroundTruth.txt; delete .* and load the data set again"):
        ds.parse_vader_sdist(_sdist(tmp_path / "v.tar.gz", {"README.txt": b"x"}))
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="junk.tar.gz: unreadable archive"):
        ds.parse_vader_sdist(junk)

