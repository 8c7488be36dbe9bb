"""A partition on disk: one train and one test JSONL file per client, the union test set, a summary."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import secrets
import shutil

from flexsfl.core.atomic import atomic_write_text
from flexsfl.core.errors import DataError
from flexsfl.edge_runtime.data import write_jsonl
from flexsfl.sim.data.dataset import Dataset
from flexsfl.sim.data.partition import Partition, partition_dataset
from flexsfl.sim.data.sources import load_dataset

__all__ = ["PARTITION_NAME", "PARTITION_FORMAT", "prepare"]

log = logging.getLogger("flexsfl.datasets")

PARTITION_NAME = "partition.json"
PARTITION_FORMAT = 1


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
    num_labels: int | None = None,
    min_examples: int | None = None,
) -> Partition:
    """Partition a data set and write it for the clients::

        out_dir/client_{k}/train.jsonl, client_{k}/test.jsonl   (k = 0..K-1)
        out_dir/test.jsonl                                       the union test set
        out_dir/partition.json                                   Partition.stats() + file list

    ``dataset`` is a :class:`Dataset` or a name for :func:`load_dataset`; with ``num_labels`` (the
    model's classes) a label outside ``0..num_labels-1`` is refused before anything is written. The output is built
    beside ``out_dir`` and renamed into place, so a failure leaves no partial directory. An
    existing ``out_dir`` is replaced only with ``overwrite=True`` and only if it holds a
    previous ``partition.json`` (so a wrong ``--out`` cannot delete unrelated files).
    """
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, cache=cache, num_labels=num_labels)
    if num_labels is not None and data.examples and int(data.labels.max()) >= num_labels:
        raise DataError(f"{data.name}: label {int(data.labels.max())} is outside num_labels {num_labels} (labels 0.."
                        f"{num_labels - 1}); raise --num-labels or leave it out to infer it from the data")
    part = partition_dataset(
        data, partition, clients, seed=seed, alpha=alpha, test_fraction=test_fraction, max_train=max_train, max_test=max_test,
        min_examples=min_examples,
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
        atomic_write_text(stage / PARTITION_NAME, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("wrote %d clients of %s (%s) to %s", clients, data.name, partition, out)
    return part
