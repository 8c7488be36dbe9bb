"""WordNet noun supersenses: the parser on a data.noun-format file (header, odd lines, the top
classes), the loader on the real file from Debian's wordnet-base (skipped only when the download
fails), and a one-line error when apt-get is missing."""

from __future__ import annotations

import pytest

from flexsfl.core.errors import DataError
from flexsfl.sim.data import load_dataset, partition_dataset
from flexsfl.sim.data.wordnet import fetch_wordnet, parse_wordnet_nouns

_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def _line(offset: int, lex: int, word: str, gloss: str) -> str:
    return f"{offset:08d} {lex:02d} n 01 {word} 0 000 | {gloss}  \n"


def test_parser_keeps_the_most_frequent_supersenses(tmp_path):
    lines = [_HEADER, "  2 Princeton University.  \n"]
    lines += [_line(i, 6, f"tool{i}", f'an implement number {i}; "he used the tool{i}"') for i in range(5)]  # artifact
    lines += [_line(10 + i, 18, f"cook{i}", f"a person who cooks {i}") for i in range(3)]  # person
    lines += [_line(20 + i, 5, f"dog{i}", f"a domestic animal {i}") for i in range(2)]  # animal
    lines += [_line(30, 20, "fern", "a plant")]  # plant: the 4th class, dropped with classes=3
    lines += ["00000040 99 n 01 odd 0 000 | a bad lexicographer file\n", "no bar here at all\n"]
    path = tmp_path / "data.noun"
    path.write_text("".join(lines))
    data = parse_wordnet_nouns(path, classes=3)
    assert data.label_names == ("noun.artifact", "noun.person", "noun.animal")
    assert data.label_counts().tolist() == [5, 3, 2] and data.groups is None
    assert data.examples[0].text == "an implement number 0"  # the usage example (naming the word) is cut
    assert data.notes == {"malformed line": 2, "other supersenses": 1}


def test_a_file_with_no_synsets_is_refused(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(_HEADER)
    with pytest.raises(DataError, match="no noun synsets found"):
        parse_wordnet_nouns(path)


def test_without_apt_get_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError) as e:
        fetch_wordnet(tmp_path / "cache")
    msg = str(e.value)
    assert "apt-get is not installed" in msg and "apt-get download wordnet-base" in msg and "\n" not in msg
    assert not list((tmp_path / "cache").glob(".download-*"))  # nothing half-written is left


def test_real_wordnet_supersenses():
    try:
        data = load_dataset("supersense")  # the cache, or apt-get download wordnet-base (a few seconds)
    except DataError as e:
        pytest.skip(f"WordNet could not be fetched here: {e}")
    assert len(data.label_names) == 10 and data.label_names[:2] == ("noun.artifact", "noun.person")
    assert data.label_counts().tolist() == [11587, 11087, 8030, 7509, 6650, 5607, 3544, 3209, 3039, 2983]
    assert data.notes["other supersenses"] == 82115 - 63245
    # the suites' Dirichlet draw: every client can fill a 200-example test split at alpha 0.1
    part = partition_dataset(data, "dirichlet", 6, seed=2, alpha=0.1, max_train=400, max_test=200, min_examples=1000)
    assert [len(c.test) for c in part.clients] == [200] * 6 and part.label_skew() > 0.5
