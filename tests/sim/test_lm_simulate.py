"""A causal-LM federation (one VADER domain per client, raw text): per-client perplexities, the
LM table, and each client's merged personal model sampled, as ``flexsfl demo --task causal-lm`` does."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from flexsfl.sim.config import DEMO_LM, SimConfig
from flexsfl.sim.results import table
from flexsfl.sim.simulate import simulate


@pytest.fixture(scope="module")
def weighted_llama(tiny_model_dirs, tmp_path_factory):
    import transformers

    from tests.tiny_models import TOKENIZER_FILES

    src, d = tiny_model_dirs["llama"], tmp_path_factory.mktemp("llama-weights")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(src)).save_pretrained(d)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, d / f)
    return d


def test_causal_lm_federation_lowers_personal_perplexity_and_samples(weighted_llama, tmp_path, capsys):
    from flexsfl.cli.demo import _samples

    cfg = SimConfig(strategy="flexpsfl", model=str(weighted_llama), task="causal-lm", data="vader", partition="natural",
                    clients=2, rounds=2, local_steps=8, batch_size=4, lr=1e-2, optimizer="adamw", splits=(1, 2),
                    max_train=32, max_test=8, max_seq=24, eval_every=0, in_process=True, out=str(tmp_path / "run"),
                    bundle_cache=str(tmp_path / "bundles"))
    assert cfg.task == "causal_lm"
    summary = simulate(cfg, show=False)
    per_round = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    # Every round has a perplexity curve point: the devices measure their personal model on their own text
    # (the server scores only the last round here, eval_every 0), and agree with the server's scoring of it.
    assert "lm" not in per_round[0] and per_round[0]["personal_ppl"] > 1.0
    for cid, c in per_round[1]["clients"].items():
        assert c["personal_ppl"] == pytest.approx(per_round[1]["lm"][cid]["personal_ppl"], rel=1e-4), cid
    rows = summary["per_client"]
    assert [c["split"] for c in rows] == [1, 2]
    for c in rows:
        for k in ("personal_ppl", "global_ppl", "pretrained_ppl", "generalization_ppl"):
            assert c[k] is not None and c[k] > 1.0, (k, c)
        # 8 AdamW steps of LoRA on its own domain: the random model gets better at its own text (measured: -12 %)
        assert c["personal_ppl"] < 0.95 * c["pretrained_ppl"], c
        assert 1.0 < c["bytes_per_token"] < 20
        assert c["tokens_per_s"] > 0  # the device's trained tokens per second of its own compute
    text = table(summary)
    assert "pretrained" in text and "generalization" in text and "c1" in text
    _samples(cfg, summary)
    out = capsys.readouterr().out
    assert out.count("->") == 2
    for cid in ("c0", "c1"):
        assert (tmp_path / "run" / "personal" / cid / "adapter_model.safetensors").is_file()


def test_demo_task_flag_selects_the_lm_demo():
    from flexsfl.cli.config_args import add_config_args, config_from_args

    p = argparse.ArgumentParser()
    add_config_args(p, SimConfig, base=DEMO_LM)
    cfg = config_from_args(SimConfig, p.parse_args(["--task", "causal-lm", "--rounds", "1"]), base=DEMO_LM)
    assert cfg.task == "causal_lm" and cfg.model == "smollm2" and cfg.rounds == 1


def test_a_users_instruction_file_trains_on_the_responses(weighted_llama, tmp_path):
    """`simulate --task causal_lm --data mine.jsonl` with prompt/response rows: the devices get each
    rendered prompt (so they put no loss on it) and the run ends with every client's perplexities."""
    import json

    rows = [{"prompt": f"Tell me about the {w} film.", "response": f"The {w} film was {v} and {u}.", "group": g}
            for g, words in (("a", "good warm funny"), ("b", "bad cold dull"))
            for w in words.split() for v in ("long", "short") for u in ("sharp", "quiet")]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SimConfig(strategy="flexpsfl", model=str(weighted_llama), task="causal_lm", data=str(data), partition="natural",
                    clients=2, rounds=1, local_steps=2, batch_size=4, lr=1e-2, optimizer="adamw", splits=(1, 1),
                    max_seq=24, eval_every=0, in_process=True, out=str(tmp_path / "run"),
                    bundle_cache=str(tmp_path / "bundles"))
    summary = simulate(cfg, show=False)
    train = [json.loads(x) for x in (tmp_path / "run" / "data" / "client_0" / "train.jsonl").read_text().splitlines()]
    assert train and all(r["prompt"] and r["text"].startswith(r["prompt"]) and "film was" in r["text"][len(r["prompt"]):]
                         for r in train)
    for c in summary["per_client"]:
        assert c["personal_ppl"] > 1.0 and c["pretrained_ppl"] > 1.0, c


@pytest.mark.slow  # a few minutes on 2 cores (CI runs ~43 of its 45 min); `make test-slow`
def test_bench_accuracy_scores_a_causal_lm_by_perplexity(weighted_llama, tmp_path):
    """`flexsfl bench accuracy --task causal-lm`: each run's rows carry per-round mean perplexities,
    the table is in perplexity, time-to-target counts a perplexity at or *below* the target, and the
    plot draws perplexity (lower is better)."""
    import json

    from flexsfl.benchmarks import accuracy

    p = argparse.ArgumentParser()
    accuracy.add_arguments(p)
    args = p.parse_args(["--task", "causal-lm", "--model", str(weighted_llama), "--strategies", "flexpsfl,local",
                         "--rounds", "2", "--local-steps", "3", "--target-ppl", "1e9", "--out", str(tmp_path / "acc")])
    rows, md = accuracy.run_accuracy(args, clients=2, splits=(1, 2), max_train=16, max_test=4, max_seq=16,
                                     batch_size=4, in_process=True, bundle_cache=str(tmp_path / "bundles"))
    assert [r["run"] for r in rows] == ["flexpsfl", "local"]
    for r in rows:
        assert r["task"] == "causal_lm"
        assert 1.0 < r["personal_ppl"] and 1.0 < r["pretrained_ppl"] and 1.0 < r["generalization_ppl"]
        assert r["round_to_target"] == 0 and r["target_ppl"] == 1e9  # any perplexity is below 1e9: reached at once
    assert "personal ppl" in md and "pretrained ppl" in md and f"{rows[0]['personal_ppl']:.2f}" in md
    per_round = [json.loads(x) for x in (tmp_path / "acc" / "flexpsfl" / "rounds.jsonl").read_text().splitlines()]
    assert len(per_round) == 2 and all(r["personal_ppl"] > 1.0 and r["global_ppl"] > 1.0 for r in per_round)
    local = json.loads((tmp_path / "acc" / "local" / "rounds.jsonl").read_text().splitlines()[-1])
    for cid, c in local["clients"].items():  # the whole model scored on the device: the server's number for it
        assert c["personal_ppl"] == pytest.approx(local["lm"][cid]["personal_ppl"], rel=1e-4), cid
    assert (tmp_path / "acc" / "accuracy_vs_time.png").stat().st_size > 10_000


@pytest.mark.slow  # a few minutes on 2 cores (CI runs ~43 of its 45 min); `make test-slow`
def test_u_shaped_causal_lm_keeps_the_lm_head_and_loss_on_the_devices(weighted_llama, tmp_path, capsys):
    """`simulate --task causal_lm --topology u`: each device holds its head and its top (the last
    block(s), final norm and LM head; u = 0 holds only those two), computes the next-token loss
    itself, and the run ends with every client's perplexities and its (split, top) in the table."""
    cfg = SimConfig(strategy="flexpsfl", topology="u", model=str(weighted_llama), task="causal_lm", data="vader",
                    partition="natural", clients=2, rounds=1, local_steps=3, batch_size=4, lr=1e-2, optimizer="adamw",
                    splits=(1, 1), tops=(1, 0), max_train=16, max_test=4, max_seq=16, eval_every=0, in_process=True,
                    out=str(tmp_path / "run"), bundle_cache=str(tmp_path / "bundles"))
    summary = simulate(cfg, show=False)
    assert summary["config"]["strategy"] == "flexpsfl-u"
    rows = summary["per_client"]
    assert [(c["split"], c["choice"]["top"]) for c in rows] == [(1, 1), (1, 0)]
    for c in rows:
        assert c["personal_ppl"] > 1.0 and c["pretrained_ppl"] > 1.0 and c["tokens_per_s"] > 0, c
    last = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[-1])
    for cid, c in last["clients"].items():  # scored on the device by its own top: the server's number for that model
        assert c["personal_ppl"] == pytest.approx(last["lm"][cid]["personal_ppl"], rel=1e-4), cid
    text = table(summary)
    assert " 1+1 " in text and " 1+0 " in text
    from flexsfl.cli.demo import _samples

    _samples(cfg, summary)  # each client's personal head + top merged with the global middle, sampled
    assert capsys.readouterr().out.count("->") == 2
    for cid in ("c0", "c1"):
        assert (tmp_path / "run" / "personal" / cid / "adapter_model.safetensors").is_file()
