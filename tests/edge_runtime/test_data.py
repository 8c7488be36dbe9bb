"""flexsfl.edge_runtime.data: reading the user's CSV/JSONL, deterministic batches, writing JSONL."""

from __future__ import annotations

import csv
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexsfl.edge_runtime.data import Example, batches, read_examples, read_grouped, write_jsonl
from flexsfl.core.errors import ConfigError, DataError


def _write(tmp_path, name: str, content: str | bytes):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def test_csv_reads_quoted_multiline_bom_and_extra_columns(tmp_path):
    p = _write(
        tmp_path,
        "data.csv",
        "\ufeffid,text,label,group\n"
        '1,"hello, world",1,a\n'
        "\n"
        '2,"two\nlines ""quoted""",0,b\n'
        "3,plain,1,a\n",
    )
    assert read_examples(p) == [Example("hello, world", 1), Example('two\nlines "quoted"', 0), Example("plain", 1)]
    examples, groups = read_grouped(p)
    assert groups == ["a", "b", "a"] and len(examples) == 3


def test_csv_string_labels_map_through_label_names(tmp_path):
    p = _write(tmp_path, "d.csv", "text,label\ngood,pos\nbad,neg\nmeh, 1 \n")
    assert [e.label for e in read_examples(p, label_names=["neg", "pos"])] == [1, 0, 1]


def test_jsonl_reads_ints_strings_and_skips_blank_lines(tmp_path):
    p = _write(
        tmp_path,
        "d.jsonl",
        '{"text": "a", "label": 0, "extra": [1]}\n\n   \n{"text": "b", "label": "pos"}\n{"label": "1", "text": "c"}',
    )
    assert read_examples(p, label_names=["neg", "pos"]) == [Example("a", 0), Example("b", 1), Example("c", 1)]


def test_jsonl_groups_may_be_ints_and_absent_groups_give_none(tmp_path):
    with_groups = _write(tmp_path, "g.jsonl", '{"text": "a", "label": 0, "group": 7}\n{"text": "b", "label": 1, "group": "x"}\n')
    assert read_grouped(with_groups)[1] == ["7", "x"]
    without = _write(tmp_path, "n.jsonl", '{"text": "a", "label": 0}\n')
    assert read_grouped(without)[1] is None
    no_column = _write(tmp_path, "n.csv", "text,label\na,0\n")
    assert read_grouped(no_column)[1] is None


# (file name, content, kwargs, expected message); every message is "file:line: what; what to do".
_BAD = [
    (
        "data.csv",
        "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(2, 17)) + "bad row,x\n",
        {},
        "data.csv:17: label 'x' is not an integer; labels must be 0..N-1 (or pass label_names to map strings)",
    ),
    ("data.csv", "text,label\na,0\nb,2\n", {"num_labels": 2}, "data.csv:3: label 2 is out of range; labels must be 0..1"),
    ("data.csv", "text,label\na,-1\n", {}, "data.csv:2: label -1 is out of range; labels must be 0..N-1"),
    ("data.csv", "text,label\na,maybe\n", {"label_names": ["no", "yes"]}, "data.csv:2: label 'maybe' is not one of the label names (no, yes) nor an integer 0..1"),
    ("data.csv", "sentence,label\na,0\n", {}, "data.csv:1: header has no 'text' column (found: sentence, label)"),
    ("data.csv", "text,label\na,0,extra\n", {}, "data.csv:2: 3 fields but the header has 2; quote texts that contain commas"),
    ("data.csv", "text,label\n  ,0\n", {}, "data.csv:2: text is empty"),
    ("data.csv", 'text,label\na,0\n"never closed,1\n', {}, "data.csv:3: not valid CSV"),
    ("data.csv", b"text,label\na,0\ncaf\xe9,1\n", {}, "data.csv:3: not UTF-8 (byte 0xe9); save the file as UTF-8"),
    ("data.csv", "", {}, "data.csv: empty file"),
    ("data.csv", "text,label\n", {}, "data.csv: no examples"),
    ("data.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1,}\n', {}, "data.jsonl:2: not valid JSON"),
    ("data.jsonl", '[1, 2]\n', {}, "data.jsonl:1: expected a JSON object, got a list"),
    ("data.jsonl", '{"label": 0}\n', {}, "data.jsonl:1: missing field 'text'"),
    ("data.jsonl", '{"text": "a"}\n', {}, "data.jsonl:1: missing field 'label'"),
    ("data.jsonl", '{"text": "a", "label": 1.5}\n', {}, "data.jsonl:1: label 1.5 is not an integer"),
    ("data.jsonl", '{"text": "a", "label": true}\n', {}, "data.jsonl:1: label True is not an integer"),
    ("data.jsonl", '{"text": 3, "label": 0}\n', {}, "data.jsonl:1: text must be a string, got int"),
    ("data.jsonl", '{"text": "a", "label": 0, "group": ""}\n', {"group": True}, "data.jsonl:1: group is empty"),
    (
        "data.jsonl",
        '{"text": "a", "label": 0, "group": "g"}\n{"text": "b", "label": 0}\n',
        {"group": True},
        "data.jsonl:2: missing field 'group'; give every row a group or none at all",
    ),
    ("data.txt", "a\t0\n", {}, "data.txt: unknown data format '.txt'"),
]


@pytest.mark.parametrize("name,content,kwargs,message", _BAD, ids=[m.split(";")[0] for *_, m in _BAD])
def test_malformed_files_raise_one_line_data_error(tmp_path, name, content, kwargs, message):
    p = _write(tmp_path, name, content)
    kwargs = dict(kwargs)
    reader = read_grouped if kwargs.pop("group", False) else read_examples
    with pytest.raises(DataError) as info:
        reader(p, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{p.parent}{os.sep}{message}"), msg
    assert "\n" not in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        read_examples(tmp_path / "nope.csv")
    d = tmp_path / "dir.csv"
    d.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_examples(d)


def test_inconsistent_label_arguments_are_config_errors(tmp_path):
    p = _write(tmp_path, "d.csv", "text,label\na,0\n")
    with pytest.raises(ConfigError, match="3 names but num_labels is 2"):
        read_examples(p, label_names=["a", "b", "c"], num_labels=2)
    with pytest.raises(ConfigError, match="duplicates"):
        read_examples(p, label_names=["a", "a"])
    with pytest.raises(ConfigError, match="not one string"):
        read_examples(p, label_names="ab")


def test_example_rejects_bad_fields():
    with pytest.raises(DataError):
        Example("x", -1)
    with pytest.raises(DataError):
        Example("x", True)
    with pytest.raises(DataError):
        Example(b"x", 0)


# --- batches --------------------------------------------------------------------------------------

_EX = [Example(f"t{i}", i % 3) for i in range(23)]


def test_batches_cover_every_example_once_and_keep_the_last_partial_batch():
    got = list(batches(_EX, 5, seed=0, epoch=0))
    assert [len(b) for b in got] == [5, 5, 5, 5, 3]
    flat = [e for b in got for e in b]
    assert sorted(flat, key=lambda e: e.text) == sorted(_EX, key=lambda e: e.text)
    assert flat != _EX  # actually shuffled


def test_batches_depend_only_on_seed_and_epoch():
    def run(seed, epoch):
        return [[e.text for e in b] for b in batches(_EX, 4, seed=seed, epoch=epoch)]

    assert run(3, 1) == run(3, 1)
    assert run(3, 1) != run(3, 2)
    assert run(3, 1) != run(4, 1)
    assert run(1, 0) != run(0, 1)  # the pair seeds the stream, not their sum


def test_batches_edge_cases():
    assert list(batches([], 4, seed=0, epoch=0)) == []
    assert [len(b) for b in batches(_EX, 100, seed=0, epoch=0)] == [23]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="batch_size"):
            list(batches(_EX, bad, seed=0, epoch=0))
    with pytest.raises(ConfigError, match="seed"):
        list(batches(_EX, 2, seed=-1, epoch=0))


# --- writing --------------------------------------------------------------------------------------


def test_write_jsonl_round_trips_and_leaves_no_temporary(tmp_path):
    examples = [Example("naïve café ✓", 1), Example('line\nbreak "q"', 0), Example("  spaces  ", 2)]
    out = tmp_path / "sub" / "train.jsonl"
    assert write_jsonl(out, examples) == 3
    assert read_examples(out) == examples
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0]) == {"label": 1, "text": "naïve café ✓"}
    assert os.listdir(out.parent) == ["train.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # usual permissions, not a private temp file's


def test_write_jsonl_failure_keeps_the_old_file(tmp_path):
    out = tmp_path / "train.jsonl"
    write_jsonl(out, [Example("old", 0)])

    def broken():
        yield Example("new", 1)
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl(out, broken())
    assert read_examples(out) == [Example("old", 0)]
    assert os.listdir(tmp_path) == ["train.jsonl"]


_texts = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_texts, st.integers(0, 4)), min_size=1, max_size=8))
def test_round_trip_property_jsonl_and_csv(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("rt")
    examples = [Example(t, y) for t, y in rows]
    write_jsonl(d / "a.jsonl", examples)
    assert read_examples(d / "a.jsonl") == examples
    # CSV as a spreadsheet or pandas would write it. "\r" alone is a record break to csv and
    # cannot survive any CSV writer, so only texts without one go this way.
    csv_rows = [(t, y) for t, y in rows if "\r" not in t]
    if csv_rows:
        with open(d / "a.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(csv_rows)
        assert read_examples(d / "a.csv") == [Example(t, y) for t, y in csv_rows]



def test_instruction_prompt_round_trips_and_must_prefix_its_text(tmp_path):
    """A causal-LM instruction row keeps its rendered prompt (the part that gets no loss)."""
    rows = [Example("Q: hi?\nA: hello.", 0, "Q: hi?\nA: "), Example("plain", 0)]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    assert read_examples(path) == rows
    assert '"prompt"' not in path.read_text().splitlines()[1]  # only rows that have one carry it
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Q: hi? A: hello.", "label": 0}\n{"text": "Q: hi? A: hello.", "prompt": "A:", "label": 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: prompt must be a proper prefix of text"):
        read_examples(bad)
    whole = tmp_path / "whole.csv"
    whole.write_text("text,label,prompt\nsame,0,same\n")
    with pytest.raises(DataError, match=r"whole.csv:2: prompt must be a proper prefix"):
        read_examples(whole)
    with pytest.raises(DataError, match="proper prefix"):
        Example("abc", 0, "x")
