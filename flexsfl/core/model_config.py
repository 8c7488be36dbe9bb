"""A model's shape, read from its Hugging Face ``config.json`` (or GGUF metadata) without loading weights or torch.

:func:`read_model_config` gives the config dict of ``minilm``, ``smollm2`` or a model directory;
:func:`config_subset` keeps the keys the cost model reads, which every bundle's manifest carries
(``extra["model_config"]``) so a device can be planned for without the model installed.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

from flexsfl.core.errors import ConfigError
from flexsfl.core.models import resolve_model

__all__ = ["FAMILIES", "read_model_config", "config_subset"]

FAMILIES = ("bert", "gpt2", "llama")

# HF config keys ModelCost reads, per family (what a bundle must carry to be planned for).
_CONFIG_KEYS = {
    "bert": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
             "max_position_embeddings", "type_vocab_size"),
    "gpt2": ("n_embd", "n_inner", "n_head", "n_layer", "vocab_size", "n_positions", "tie_word_embeddings"),
    "llama": ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
              "attention_bias", "mlp_bias"),
}
# GGUF metadata key (after "<arch>.") -> HF LlamaConfig key, as transformers' GGUF loader maps them.
_GGUF_LLAMA = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "rope.dimension_count": "head_dim",
    "block_count": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
}



def config_subset(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a HF config dict that :meth:`ModelCost.from_config` reads (for a bundle's manifest)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"model config: model_type {family!r} is not supported; flexsfl plans for {', '.join(FAMILIES)}")
    return {"model_type": family, **{k: config[k] for k in _CONFIG_KEYS[family] if config.get(k) is not None}}


def read_model_config(name_or_path: str) -> dict[str, Any]:
    """The HF config dict of ``minilm``, ``smollm2`` or a model directory, without loading weights or torch."""
    src = resolve_model(name_or_path)
    if src.gguf_file:
        return _gguf_config(src.path / src.gguf_file)
    path = src.path / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the model config ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return config


def _gguf_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"reading {path.name} needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/OSError/struct errors for bad files
        raise ConfigError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; flexsfl reads llama GGUF files")
    config: dict[str, Any] = {"model_type": "llama"}
    for key, hf in _GGUF_LLAMA.items():
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None:
            config[hf] = field.contents()
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in reader.fields:
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    # As transformers decides it: without an output.weight tensor the LM head is the embedding.
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    return config

