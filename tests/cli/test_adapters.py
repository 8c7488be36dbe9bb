"""``flexsfl adapters merge`` and ``flexsfl generate`` on real files.

A tiny Llama *with weights* (the base a PEFT adapter needs), real bundles exported from it, a
server state dir (``global.safetensors``) and a device state dir (``personal.safetensors`` with
``theta/``, ``phi/`` and ``opt/`` tensors, as the edge runtime writes it) holding distinct trained
values. The merged adapter, loaded with plain ``PeftModel.from_pretrained`` on the base model,
must give the split model's logits ``tail_global(head_personal(x))`` to 1e-4.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from flexsfl.cli.main import main
from flexsfl.core.bundle import load_bundle
from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_head, build_tail, canonical_names

SPLIT = 2


@pytest.fixture(scope="module")
def weighted_llama(tiny_model_dirs, tmp_path_factory):
    import transformers

    from tests.tiny_models import TOKENIZER_FILES

    src = tiny_model_dirs["llama"]
    d = tmp_path_factory.mktemp("llama-weights")
    config = transformers.AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(d)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, d / f)
    return d


def _bundle(model_dir, task, out):
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    export_bundle(ExportConfig(model=str(model_dir), split=SPLIT, out=str(out), backend="ort", task=task, num_labels=3,
                               max_batch=4, max_seq=32, ort_training_artifacts=False), progress=False)
    return out


def _states(model_dir, task, bundle, tmp_path):
    """A server state dir and a device state dir whose tensors differ from the initial ones and each other."""
    from safetensors.numpy import save_file

    lm = load_model(str(model_dir), task=task, num_labels=3)
    names = canonical_names(lm.model)
    init = {names[id(p)]: p.detach().numpy() for p in lm.model.parameters() if p.requires_grad}
    rng = np.random.default_rng(1)
    glob = {n: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in init.items()}
    heads = [p.name for p in load_bundle(bundle).manifest.trainable_parameters]
    theta = {n: (init[n] + 0.05 * rng.standard_normal(init[n].shape)).astype(np.float32) for n in heads}
    (tmp_path / "server").mkdir()
    save_file(glob, str(tmp_path / "server" / "global.safetensors"), metadata={"round_id": "3"})
    (tmp_path / "device").mkdir()
    device = {f"theta/{n}": v for n, v in theta.items()}
    device.update({f"phi/{n}": glob[n] for n in heads})
    device["opt/step"] = np.zeros(1, np.float32)
    save_file(device, str(tmp_path / "device" / "personal.safetensors"))
    return glob, theta


def _split_logits(model_dir, task, glob, theta, ids, mask):
    lm = load_model(str(model_dir), task=task, num_labels=3)
    names = canonical_names(lm.model)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                n = names[id(p)]
                p.copy_(torch.from_numpy(theta.get(n, glob[n])))
        return build_tail(lm, SPLIT)(build_head(lm, SPLIT)(ids, mask), mask)


def _batch():
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
    return ids, (ids != 0).long()


# causal_lm in `make test` (its tied LM head is the harder merge); seq_cls in `make test-slow` (CI time)
@pytest.mark.parametrize("task", ["causal_lm", pytest.param("seq_cls", marks=pytest.mark.slow)])
def test_merged_adapter_reproduces_the_split_model(weighted_llama, tmp_path, task, capsys):
    import transformers
    from peft import PeftModel

    bundle = _bundle(weighted_llama, task, tmp_path / "bundle")
    glob, theta = _states(weighted_llama, task, bundle, tmp_path)
    out = tmp_path / "personal-model"
    assert main(["adapters", "merge", "--bundle", str(bundle), "--personal", str(tmp_path / "device"),
                 "--server-state", str(tmp_path / "server"), "--out", str(out), "--merge"]) == 0
    ids, mask = _batch()
    want = _split_logits(weighted_llama, task, glob, theta, ids, mask)
    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification
    kw = {} if task == "causal_lm" else {"num_labels": 3}
    base = auto.from_pretrained(str(weighted_llama), dtype=torch.float32, **kw)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    merged = auto.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        for got in (peft_model(input_ids=ids, attention_mask=mask).logits, merged(input_ids=ids, attention_mask=mask).logits):
            if task == "causal_lm":
                got, ref = got[mask.bool()], want[mask.bool()]  # padding positions predict nothing
            else:
                ref = want
            assert (got - ref).abs().max().item() <= 1e-4
    # The personal head matters: the global model alone gives other logits.
    with torch.no_grad():
        other = _split_logits(weighted_llama, task, glob, {}, ids, mask)
    assert (other - want).abs().max().item() > 1e-3


def test_generate_from_the_merged_model_and_one_line_errors(weighted_llama, tmp_path, capsys):
    from flexsfl.cli.generate import generate

    bundle = _bundle(weighted_llama, "causal_lm", tmp_path / "bundle")
    _states(weighted_llama, "causal_lm", bundle, tmp_path)
    out = tmp_path / "personal-model"
    assert main(["adapters", "merge", "--bundle", str(bundle), "--personal", str(tmp_path / "device"),
                 "--server-state", str(tmp_path / "server"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "this is a", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    assert text.strip() and text == generate(str(out), "this is a", max_new_tokens=6) + "\n"  # greedy: deterministic
    # The output exists: refused without --force; a dir without personal state: one line naming it.
    assert main(["adapters", "merge", "--bundle", str(bundle), "--personal", str(tmp_path / "device"),
                 "--server-state", str(tmp_path / "server"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["adapters", "merge", "--bundle", str(bundle), "--personal", str(tmp_path),
                 "--server-state", str(tmp_path / "server"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "personal.safetensors" in err and len(err.strip().splitlines()) == 1
