"""The packaged data sets, loaded once per test module."""

import pytest

from flexsfl.sim import data as ds

VADER_DOMAIN_COUNTS = {  # (negative, positive) per domain, score 0 dropped
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
