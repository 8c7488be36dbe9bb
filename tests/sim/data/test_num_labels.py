"""User data of any number of classes: inferred from the labels, or fixed with num_labels, and a
label outside it refused in one line (naming the file and line) before anything is written."""

import pytest

from flexsfl.core.errors import DataError
from flexsfl.sim.data import load_dataset, prepare


def _csv(path, labels, group=False):
    rows = ["text,label" + (",group" if group else "")]
    rows += [f"text number {i} of class {y},{y}" + (f",g{i % 3}" if group else "") for i, y in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_ten_classes_are_inferred(tmp_path):
    data = load_dataset(str(_csv(tmp_path / "ten.csv", [i % 10 for i in range(40)])))
    assert data.label_names == tuple(str(i) for i in range(10)) and data.groups is None


def test_num_labels_widens_the_names_and_refuses_labels_outside_it(tmp_path):
    path = _csv(tmp_path / "five.csv", [i % 5 for i in range(20)])
    assert len(load_dataset(str(path), num_labels=8).label_names) == 8
    with pytest.raises(DataError, match=r"five.csv:4: label 2 is out of range; labels must be 0..1"):
        load_dataset(str(path), num_labels=2)


def test_prepare_refuses_before_writing(tmp_path):
    path = _csv(tmp_path / "ten.csv", [i % 10 for i in range(40)])
    with pytest.raises(DataError, match="out of range"):
        prepare(str(path), "iid", 2, tmp_path / "out", num_labels=4)
    assert not (tmp_path / "out").exists()
    part = prepare(str(path), "iid", 2, tmp_path / "out")
    assert len(part.label_names) == 10 and [c.groups for c in part.clients] == [(), ()]  # no group column
