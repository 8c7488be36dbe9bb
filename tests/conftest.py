import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny_models import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{"gpt2": dir, "llama": dir}: small random decoders with a real tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: make_tiny_model_dir(f, root / f) for f in ("gpt2", "llama")}
