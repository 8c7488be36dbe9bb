import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny_models import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{"bert": dir, "gpt2": dir, "llama": dir}: small random models with a real tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: make_tiny_model_dir(f, root / f) for f in ("bert", "gpt2", "llama")}


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_model_dirs):
    """``get(family, split, backend, num_labels=2)``: a bundle exported once per session and shared.

    Exports are the slow part of many tests (programs, lowering); tests that only read a bundle
    share these instead of exporting their own.
    """
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("tiny-bundles")
    made = {}

    def get(family: str, split: int, backend: str, num_labels: int = 2):
        key = (family, split, backend, num_labels)
        if key not in made:
            out = root / f"{family}-s{split}-{backend}-{num_labels}"
            export_bundle(ExportConfig(model=str(tiny_model_dirs[family]), split=split, out=str(out), backend=backend,
                                       num_labels=num_labels, max_batch=8, max_seq=48, ort_training_artifacts=False),
                          progress=False)
            made[key] = out
        return made[key]

    return get
