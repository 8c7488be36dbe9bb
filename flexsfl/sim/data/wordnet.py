"""WordNet 3.0 noun supersenses: a many-class, offline text task (gloss -> lexicographer file).

``supersense``: every noun synset of WordNet 3.0's ``data.noun`` is one example; its text is the
gloss's definition (the part before the quoted usage examples, which often name the word), its
label the synset's lexicographer file, i.e. its *supersense* (``noun.artifact``, ``noun.person``,
...). Only the :data:`SUPERSENSES` most frequent classes are kept (10 of 26: 63,245 of 82,115
synsets), so a Dirichlet label skew over them is a real many-class personalization task.

The file comes from Debian's ``wordnet-base`` package (WordNet 3.0 license, BSD-like), fetched
once with ``apt-get download`` (no root needed) and unpacked with ``dpkg-deb -x`` into the cache
(``$FLEXSFL_CACHE``, else ``~/.cache/flexsfl``); ``data.noun`` is checked against its sha256 before
it is renamed into place, as the VADER archive is (:mod:`flexsfl.sim.data.sources`).
"""

from __future__ import annotations

import collections
import logging
import os
import pathlib

from flexsfl.core.errors import DataError
from flexsfl.edge_runtime.data import Example
from flexsfl.sim.data.cache import cache_dir, fetch_verified, run_tool
from flexsfl.sim.data.dataset import Dataset

__all__ = ["WORDNET_PACKAGE", "SUPERSENSES", "NOUN_LEXFILES", "fetch_wordnet", "parse_wordnet_nouns", "load_wordnet"]

log = logging.getLogger("flexsfl.datasets")

WORDNET_PACKAGE = "wordnet-base"
SUPERSENSES = 10  # classes kept: the most frequent lexicographer files
_DATA_NOUN = "data.noun"
_CACHE_NAME = "wordnet-3.0-data.noun"
# sha256 of WordNet 3.0's data.noun as Debian ships it (wordnet-base 1:3.0-37): a truncated or
# different file in the cache is fetched again.
_DATA_NOUN_SHA256 = "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2"

# WordNet's lexnames for nouns (file numbers 03..28; the package ships no lexnames file).
NOUN_LEXFILES = {
    3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition", 10: "communication",
    11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 16: "motive", 17: "object", 18: "person",
    19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity", 24: "relation", 25: "shape",
    26: "state", 27: "substance", 28: "time",
}


def fetch_wordnet(cache: str | os.PathLike | None = None, *, timeout: float = 300) -> pathlib.Path:
    """Path of WordNet 3.0's ``data.noun`` in the cache, fetching Debian's ``wordnet-base`` if needed.

    ``apt-get download`` and ``dpkg-deb -x`` run in a private temporary directory of the cache and
    the file is renamed into place only after its sha256 matched
    (:func:`~flexsfl.sim.data.cache.fetch_verified`). Raises :class:`DataError` (one line: what
    failed, what to do) when apt-get or dpkg-deb is missing, the package index is unreachable, or
    the file differs.
    """
    root = pathlib.Path(cache) if cache is not None else cache_dir()
    target = root / _CACHE_NAME
    fix = (f"on a Debian/Ubuntu machine with network run `apt-get download {WORDNET_PACKAGE} && dpkg-deb -x "
           f"{WORDNET_PACKAGE}_*.deb x` and copy x/usr/share/wordnet/{_DATA_NOUN} to {target}")
    what = f"WordNet 3.0 ({WORDNET_PACKAGE})"

    def download(tmp: pathlib.Path) -> pathlib.Path:
        log.info("fetching WordNet: apt-get download %s -> %s", WORDNET_PACKAGE, root)
        run_tool(["apt-get", "download", WORDNET_PACKAGE], tmp, what=what, fix=fix, timeout=timeout)
        debs = sorted(tmp.glob(f"{WORDNET_PACKAGE}_*.deb"))
        if not debs:
            raise DataError(f"apt-get download {WORDNET_PACKAGE} left no .deb file; {fix}")
        run_tool(["dpkg-deb", "-x", str(debs[-1]), "x"], tmp, what=what, fix=fix, timeout=timeout)
        got = tmp / "x" / "usr" / "share" / "wordnet" / _DATA_NOUN
        if not got.is_file():
            raise DataError(f"{debs[-1].name} holds no usr/share/wordnet/{_DATA_NOUN}; {fix}")
        return got

    return fetch_verified(target, _DATA_NOUN_SHA256, download, what=f"{what} {_DATA_NOUN}", fix=fix)


def parse_wordnet_nouns(path: str | os.PathLike, *, classes: int = SUPERSENSES) -> Dataset:
    """``data.noun`` as a data set: one example per synset (text: the gloss's definition; label: its
    supersense), the ``classes`` most frequent supersenses only, labelled 0.. by falling frequency.

    A data line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; the license header's
    lines start with two spaces. No groups: partition it with ``dirichlet`` or ``iid``."""
    rows: list[tuple[str, int]] = []
    notes: collections.Counter = collections.Counter()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # the license header
                fields, bar, gloss = line.partition(" | ")
                parts = fields.split(" ", 2)
                if not bar or len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) not in NOUN_LEXFILES:
                    notes["malformed line"] += 1
                    continue
                definition = gloss.split('; "')[0].strip().rstrip(";").strip()
                if not definition:
                    notes["empty gloss"] += 1
                    continue
                rows.append((definition, int(parts[1])))
    except OSError as e:
        raise DataError(f"{path}: cannot read WordNet's {_DATA_NOUN} ({e.strerror}); delete it to fetch it again") from None
    if not rows:
        raise DataError(f"{path}: no noun synsets found; it is not WordNet's {_DATA_NOUN} (delete it to fetch it again)")
    counts = collections.Counter(lex for _, lex in rows)
    kept = [lex for lex, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:classes]]
    label = {lex: i for i, lex in enumerate(kept)}
    examples = tuple(Example(text, label[lex]) for text, lex in rows if lex in label)
    notes["other supersenses"] = len(rows) - len(examples)
    return Dataset(name="supersense", examples=examples, groups=None,
                   label_names=tuple(f"noun.{NOUN_LEXFILES[lex]}" for lex in kept),
                   source=f"WordNet 3.0 {_DATA_NOUN} (Debian {WORDNET_PACKAGE})", notes=dict(notes))


def load_wordnet(cache: str | os.PathLike | None = None) -> Dataset:
    """The supersense data set, fetching ``data.noun`` into the cache on first use (a few seconds)."""
    return parse_wordnet_nouns(fetch_wordnet(cache))
