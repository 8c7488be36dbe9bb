"""Fixtures of the U-shaped integration tests (``test_u_*.py``): tiny models, ``--top`` bundles
exported once per session, and two clients' data."""

import pytest

from .u_reference import make_data, u_bundles as _u_bundles


@pytest.fixture(scope="session")
def u_models(tiny_model_dirs):
    return tiny_model_dirs


@pytest.fixture(scope="session")
def u_bundles(tmp_path_factory, u_models):
    """``get(family, split, top, backend)``: a bundle exported with ``--top``, shared by the session."""
    return _u_bundles(tmp_path_factory.mktemp("u-bundles"), u_models)


@pytest.fixture(scope="session")
def u_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("u-data"))
