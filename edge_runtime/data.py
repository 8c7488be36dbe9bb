"""A device's own labelled text: reading CSV/JSONL files, deterministic mini-batches, writing JSONL.

Two file formats, chosen by extension:

- ``.csv``: a header row naming at least ``text`` and ``label`` (other columns are ignored);
- ``.jsonl`` (or ``.ndjson``): one object per line, ``{"text": "...", "label": 1}``; blank lines
  are skipped, other keys are ignored.

Either may carry an optional ``prompt`` (causal LM, instruction format): a proper prefix of
``text`` whose tokens get no loss (see :class:`Example`).

Labels are integers ``0..N-1``, or strings mapped to their index in an explicit ``label_names``
list. Every malformed row is a :class:`~flexsfl.core.errors.DataError` whose one-line message
names the file, the line and the field, e.g. ``data.csv:17: label 'x' is not an integer; labels
must be 0..N-1 (or pass label_names to map strings)``. Nothing is half-read: a file either loads
completely or raises.

numpy is the only dependency; this module runs on the device.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from flexsfl.core.atomic import atomic_path
from flexsfl.core.errors import ConfigError, DataError

__all__ = ["Example", "read_examples", "read_grouped", "write_jsonl", "batches"]

_CSV_SUFFIXES = {".csv"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_INT = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled text. ``label`` is the class index, ``0 <= label < num_labels``.

    ``prompt`` (instruction format, causal LM only): a proper prefix of ``text`` — the rendered
    prompt — whose tokens carry no loss, so the model learns the response only. Empty: the whole
    text is learned.
    """

    text: str
    label: int
    prompt: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise DataError(f"Example.text must be a str, got {type(self.text).__name__}")
        if not isinstance(self.label, int) or isinstance(self.label, bool) or self.label < 0:
            raise DataError(f"Example.label must be an int >= 0, got {self.label!r}")
        if not isinstance(self.prompt, str):
            raise DataError(f"Example.prompt must be a str, got {type(self.prompt).__name__}")
        if self.prompt and (not self.text.startswith(self.prompt) or len(self.prompt) == len(self.text)):
            raise DataError("Example.prompt must be a proper prefix of its text (the rendered prompt before the response)")


def read_examples(
    path: str | os.PathLike,
    *,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
) -> list[Example]:
    """Read every example of a CSV or JSONL file, in file order.

    ``label_names`` maps string labels to their index (and fixes N = ``len(label_names)``);
    ``num_labels`` fixes N for integer labels (pass the model's class count so an out-of-range
    label fails here, not inside training). Raises :class:`DataError` on the first bad row.
    """
    return _read(path, label_names, num_labels, None)[0]


def read_grouped(
    path: str | os.PathLike,
    *,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    group_field: str = "group",
) -> tuple[list[Example], list[str] | None]:
    """Like :func:`read_examples`, also returning each example's ``group_field`` value.

    The groups list is parallel to the examples, or ``None`` when the file has no such column
    (CSV) or no row has that key (JSONL). A file where only some rows name a group is an error.
    """
    return _read(path, label_names, num_labels, group_field)


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> int:
    """Write examples as JSONL (one ``{"label": ..., "text": ...}`` object per line).

    The file appears atomically (written beside it, then renamed), so a crash never leaves a
    truncated data file behind. Parent directories are created. Returns the number written.
    """
    path = pathlib.Path(path)
    n = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for ex in examples:
                row = {"label": ex.label, "text": ex.text, **({"prompt": ex.prompt} if ex.prompt else {})}
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True))
                f.write("\n")
                n += 1
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror}); choose a writable location") from None
    return n


def batches(examples: Sequence[Example], batch_size: int, *, seed: int, epoch: int) -> Iterator[list[Example]]:
    """Yield one epoch of mini-batches in a shuffled order that depends only on ``(seed, epoch)``.

    Every example appears exactly once per epoch; the last batch holds the remainder (it is
    kept, not dropped), so there are ``ceil(len(examples) / batch_size)`` batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for name, v in (("seed", seed), ("epoch", epoch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ConfigError(f"{name} must be an int >= 0, got {v!r}")
    # Seeding with the pair (not seed + epoch) keeps (1, 0) and (0, 1) different streams.
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(examples))
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


# --- reading ------------------------------------------------------------------------------------


def _read(
    path: str | os.PathLike,
    label_names: Sequence[str] | None,
    num_labels: int | None,
    group_field: str | None,
) -> tuple[list[Example], list[str] | None]:
    where = str(path)
    names = _check_names(label_names, num_labels)
    n = len(names) if names is not None else num_labels
    suffix = pathlib.Path(path).suffix.lower()
    if suffix in _CSV_SUFFIXES:
        rows = _csv_rows
    elif suffix in _JSONL_SUFFIXES:
        rows = _jsonl_rows
    else:
        raise DataError(
            f"{where}: unknown data format {suffix or '(no extension)'!r}; use a .csv file with a "
            f"'text,label' header or a .jsonl file with one {{\"text\": ..., \"label\": ...}} per line"
        )
    examples: list[Example] = []
    groups: list[str | None] = []
    first_missing: int | None = None  # line of the first row without a group
    for line, row in rows(where, _decode(where, _read_bytes(where))):
        text = _field(row, "text", where, line)
        if not isinstance(text, str):
            raise DataError(f"{where}:{line}: text must be a string, got {_json_type(text)}")
        if not text.strip():
            raise DataError(f"{where}:{line}: text is empty; remove the row or fill in its text")
        label = _label(_field(row, "label", where, line), names, n, f"{where}:{line}")
        examples.append(Example(text, label, _prompt(row.get("prompt"), text, f"{where}:{line}")))
        if group_field is not None:
            group = _group(row.get(group_field), group_field, f"{where}:{line}")
            if group is None and first_missing is None:
                first_missing = line
            groups.append(group)
    if not examples:
        raise DataError(f"{where}: no examples; the file must hold at least one labelled row")
    if group_field is None or all(g is None for g in groups):
        return examples, None
    if first_missing is not None:
        raise DataError(f"{where}:{first_missing}: missing field {group_field!r}; give every row a group or none at all")
    return examples, groups  # every row named a group


def _check_names(label_names: Sequence[str] | None, num_labels: int | None) -> tuple[str, ...] | None:
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ConfigError(f"num_labels must be an int >= 1, got {num_labels!r}")
    if label_names is None:
        return None
    if isinstance(label_names, str):
        raise ConfigError("label_names must be a list of strings, not one string")
    names = tuple(label_names)
    if not names or not all(isinstance(s, str) and s for s in names):
        raise ConfigError(f"label_names must be non-empty strings, got {list(names)!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"label_names has duplicates: {list(names)!r}")
    if num_labels is not None and num_labels != len(names):
        raise ConfigError(f"label_names has {len(names)} names but num_labels is {num_labels}")
    return names


def _read_bytes(where: str) -> bytes:
    try:
        with open(where, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{where}: no such file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{where}: is a directory; give the path of a .csv or .jsonl file") from None
    except OSError as e:
        raise DataError(f"{where}: cannot read ({e.strerror})") from None


def _decode(where: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheet programs prepend a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{where}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def _csv_rows(where: str, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [h.strip() for h in row]
                for need in ("text", "label"):
                    if need not in header:
                        raise DataError(
                            f"{where}:{line}: header has no {need!r} column (found: {', '.join(header)}); "
                            f"the first row must name the 'text' and 'label' columns"
                        )
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{where}:{line}: {len(row)} fields but the header has {len(header)}; "
                    f"quote texts that contain commas"
                )
            yield line, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"{where}:{reader.line_num}: not valid CSV ({e})") from None
    if header is None:
        raise DataError(f"{where}: empty file; the first row must name the 'text' and 'label' columns")


def _jsonl_rows(where: str, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # JSON Lines are separated by "\n" only; str.splitlines would also cut at U+2028, U+0085...,
    # which json.dumps(ensure_ascii=False) leaves unescaped inside strings.
    for line, s in enumerate(text.split("\n"), start=1):
        if not s.strip():
            continue
        try:
            row = json.loads(s)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}:{line}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                f"object like {{\"text\": \"...\", \"label\": 0}}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{where}:{line}: expected a JSON object, got {_json_type(row)}")
        yield line, row


def _field(row: Mapping[str, Any], name: str, where: str, line: int) -> Any:
    if name not in row:
        raise DataError(f"{where}:{line}: missing field {name!r}; every row needs 'text' and 'label'")
    return row[name]


def _label(value: Any, names: tuple[str, ...] | None, n: int | None, at: str) -> int:
    """The class index of one raw label (a JSON int, or a string from CSV or JSON)."""
    if isinstance(value, str):
        if names is not None and value in names:
            return names.index(value)
        if not _INT.fullmatch(value.strip()):
            if names is not None:
                raise DataError(f"{at}: label {value!r} is not one of the label names ({', '.join(names)}) nor an integer 0..{len(names) - 1}")
            raise DataError(f"{at}: label {value!r} is not an integer; labels must be 0..N-1 (or pass label_names to map strings)")
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{at}: label {value!r} is not an integer; labels must be 0..N-1")
    if value < 0 or (n is not None and value >= n):
        bound = f"0..{n - 1}" if n is not None else "0..N-1"
        raise DataError(f"{at}: label {value} is out of range; labels must be {bound}")
    return value


def _prompt(value: Any, text: str, at: str) -> str:
    """The row's optional ``prompt``: absent/empty, or a proper prefix of its text."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise DataError(f"{at}: prompt must be a string, got {_json_type(value)}")
    if not text.startswith(value) or len(value) == len(text):
        raise DataError(f"{at}: prompt must be a proper prefix of text (the rendered prompt before the response); "
                        f"render both with the same chat template")
    return value


def _group(value: Any, field: str, at: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{at}: {field} must be a string or an integer, got {_json_type(value)}")
    group = str(value).strip()
    if not group:
        raise DataError(f"{at}: {field} is empty; name a group for every row or drop the column")
    return group


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__
    )
