"""A labelled text data set: examples, their groups (the natural unit of non-IID data), label names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from flexsfl.core.errors import DataError
from flexsfl.edge_runtime.data import Example

__all__ = ["Dataset"]


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

