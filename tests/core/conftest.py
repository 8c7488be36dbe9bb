"""Fixtures shared by the core's tests (torch-free)."""

import pytest

from flexsfl.core.cost import ModelCost
from flexsfl.core.model_config import read_model_config


@pytest.fixture(scope="module")
def minilm_cost():
    """The cost model of the packaged MiniLM (read from its config.json)."""
    return ModelCost.from_config(read_model_config("minilm"))
