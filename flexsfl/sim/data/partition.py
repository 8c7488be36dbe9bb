"""How a data set is split among K federated clients, each a pure function of (data set, K, seed, options).

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
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from flexsfl.core.errors import ConfigError, DataError
from flexsfl.edge_runtime.data import Example
from flexsfl.sim.data.dataset import Dataset

__all__ = ["SCHEMES", "ClientSplit", "Partition", "partition_dataset"]

log = logging.getLogger("flexsfl.datasets")

SCHEMES = ("natural", "dirichlet", "iid")

# A client with fewer examples than this cannot hold a useful train/test split; the Dirichlet
# draw is repeated until every client has at least min(_MIN_CLIENT, N // K).
_MIN_CLIENT = 10
_DIRICHLET_DRAWS = 1000


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
    min_examples: int | None = None,
) -> Partition:
    """Split ``dataset`` among ``clients`` clients; the same arguments give the same partition.

    ``alpha`` is used by ``dirichlet`` only. Each client's test share is ``test_fraction`` of
    its examples (at least one each way), stratified by label; ``max_test`` then caps each
    client's test set and ``max_train`` its train set (after duplicates of test texts are
    removed from it). ``min_examples`` (``dirichlet``): the proportions are drawn again until every
    client holds at least this many examples (e.g. enough for a full ``max_test``), up to 1000 draws.
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
        parts = _dirichlet(dataset, labels, clients, float(alpha), rng, min_examples)
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


def _dirichlet(dataset: Dataset, labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator,
               min_examples: int | None = None) -> list[np.ndarray]:
    """Hsu et al. 2019 label skew: class c's examples are cut among clients by p_c ~ Dir(alpha·1)."""
    floor = max(min(_MIN_CLIENT, len(labels) // k), min_examples or 0)
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
        f"{_DIRICHLET_DRAWS} draws; raise --alpha, lower the minimum or use fewer --clients"
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

