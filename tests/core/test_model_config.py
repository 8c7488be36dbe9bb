"""Reading a model's shape without torch: packaged names, directories, GGUF, bad configs."""

from __future__ import annotations

import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.core.cost import ModelCost
from flexsfl.core.model_config import read_model_config
from tests.no_torch import run_without_torch


def test_bad_model_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_type 't5' is not supported"):
        ModelCost.from_config({"model_type": "t5"})
    with pytest.raises(ConfigError, match="missing 'intermediate_size' for a llama model"):
        ModelCost.from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                               "num_hidden_layers": 4, "max_position_embeddings": 128, "vocab_size": 100})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: cannot read the model config"):
        read_model_config(str(tmp_path))
    with pytest.raises(ConfigError, match="neither a packaged model"):
        read_model_config(str(tmp_path / "nowhere"))


def test_model_config_reads_without_torch():
    out = run_without_torch("import flexsfl.core.model_config as m\nm.read_model_config('minilm')\nassert not BLOCKED_ATTEMPTS")
    assert out.returncode == 0, out.stderr[-2000:]
