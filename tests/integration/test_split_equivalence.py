"""Split training over real websockets equals centralized eager training.

One ``flexsfl serve`` process and one or two ``flexsfl edge run`` processes on loopback, SGD,
fixed data order, 10 steps: the adapters and task head the server persists after the round equal
those of an eager PyTorch reference that trains the same full Hugging Face model on the same
batches, in the order the server applied them (rel err <= 1e-4).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from edge_runtime.bundle import load_bundle
from edge_runtime.data import read_examples, write_jsonl
from edge_runtime.text import TextEncoder
from edge_runtime.trainer import BatchCursor
from export.models import load_model
from export.partition import block_of, canonical_names, task_loss
from server_backend.aggregation import ClientUpdate, layerwise_fedavg

from .harness import events, finish, flexsfl, free_port, load_global, rel_err, wait_listening

LR, STEPS, BATCH, LABELS = 0.05, 10, 4, 2


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dirs):
    from server_backend.datasets import load_rotten

    root = tmp_path_factory.mktemp("equiv")
    rotten = load_rotten().examples
    data = {}
    for k, cid in enumerate(("a", "b")):
        data[cid] = root / f"{cid}.jsonl"
        write_jsonl(data[cid], rotten[k * 60 : k * 60 + 60])
    return {"root": root, "model": tiny_model_dirs["llama"], "data": data, "bundles": {}}


def _bundle(work, split: int, backend: str) -> pathlib.Path:
    from export.pipeline import ExportConfig, export_bundle

    key = (split, backend)
    if key not in work["bundles"]:
        out = work["root"] / f"bundle-s{split}-{backend}"
        export_bundle(ExportConfig(model=str(work["model"]), split=split, out=str(out), backend=backend, num_labels=LABELS,
                                   max_batch=8, max_seq=48, ort_training_artifacts=False), progress=False)
        work["bundles"][key] = out
    return work["bundles"][key]


def _federate(work, tmp_path, clients: list[tuple[str, int, str]]) -> pathlib.Path:
    """Run one round with these (client id, split, backend); returns the server's state dir."""
    root = work["root"]
    reg = tmp_path / "clients.json"
    procs = {}
    from server_backend.clients import add_client

    for cid, _, _ in clients:
        (tmp_path / f"{cid}.token").write_text(add_client(reg, cid))
    port = free_port()
    state = tmp_path / "state"
    log = tmp_path / "server.log"
    server = flexsfl("serve", "--model", str(work["model"]), "--num-labels", str(LABELS), "--port", str(port),
                     "--clients", str(reg), "--state-dir", str(state), "--rounds", "1", "--local-steps", str(STEPS),
                     "--batch-size", str(BATCH), "--lr", str(LR), "--optimizer", "sgd", "--no-batching", "--threads", "1",
                     "--min-clients", str(len(clients)), log=log)
    procs["server"] = (server, log)
    wait_listening(port, server, log)
    for cid, split, backend in clients:
        clog = tmp_path / f"{cid}.log"
        p = flexsfl("edge", "run", "--bundle", str(_bundle(work, split, backend)), "--server", f"ws://127.0.0.1:{port}",
                    "--data", str(work["data"][cid]), "--client-id", cid, "--token-file", str(tmp_path / f"{cid}.token"),
                    "--backend", backend, "--threads", "1", "--state-dir", str(tmp_path / f"state-{cid}"), "--seed", "0",
                    "--max-retries", "3", log=clog)
        procs[cid] = (p, clog)
    finish(procs, timeout=600)
    return state


def _reference(work, clients: list[tuple[str, int, str]], order: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Eager PyTorch: the full HF model, personal head copies per client, the server's tail shared."""
    lm = load_model(str(work["model"]), num_labels=LABELS, attn_implementation="eager")
    names = canonical_names(lm.model)
    params = {names[id(p)]: p for p in lm.model.parameters() if p.requires_grad}
    L = lm.info.num_blocks
    phi = {n: p.detach().clone() for n, p in params.items()}
    init = {n: t.clone() for n, t in phi.items()}
    split = {cid: s for cid, s, _ in clients}
    theta = {cid: {n: phi[n].clone() for n in phi if block_of(n, L) < split[cid]} for cid in split}
    enc = TextEncoder.from_bundle(load_bundle(_bundle(work, clients[0][1], clients[0][2])))
    cursors = {cid: BatchCursor(read_examples(work["data"][cid]), 0) for cid in split}
    samples = {cid: 0 for cid in split}
    for cid, _ in order:
        batch = cursors[cid].next(BATCH)
        samples[cid] += len(batch)
        tok = enc.encode([e.text for e in batch])
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[cid][n] if n in theta[cid] else phi[n])
        for p in params.values():
            p.grad = None
        logits = lm.model(input_ids=torch.from_numpy(tok.input_ids), attention_mask=torch.from_numpy(tok.attention_mask)).logits
        task_loss(logits, torch.tensor([e.label for e in batch]), "seq_cls").backward()
        with torch.no_grad():
            for n, p in params.items():
                own = theta[cid] if n in theta[cid] else phi
                own[n] = own[n] - LR * p.grad
    ups = [ClientUpdate({n: t.numpy() for n, t in theta[cid].items()}, samples[cid], split[cid]) for cid in split]
    final = layerwise_fedavg({n: t.numpy() for n, t in phi.items()}, {n: block_of(n, L) for n in phi}, ups)
    return final, {n: t.numpy() for n, t in init.items()}


def _check(state: pathlib.Path, reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> None:
    want, init = reference
    got = load_global(state)
    assert set(got) == set(want)
    errs = {n: rel_err(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-4, f"{worst}: rel err {errs[worst]:.2e}"
    # every tensor moved: the comparison is not between two untouched initial states
    moved = {n: rel_err(want[n], init[n]) if np.linalg.norm(init[n]) else float(np.linalg.norm(want[n])) for n in want}
    assert min(moved.values()) > 1e-4, min(moved, key=moved.get)


def _order(state: pathlib.Path) -> list[tuple[str, int]]:
    out = []
    for e in events(state, "batch"):
        for tag in e["steps"]:
            cid, _, step = tag.split(":")
            out.append((cid, int(step)))
    return out


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_one_client_equals_centralized(work, tmp_path, backend):
    clients = [("a", 2, backend)]
    state = _federate(work, tmp_path, clients)
    order = _order(state)
    assert order == [("a", i) for i in range(STEPS)]
    _check(state, _reference(work, clients, order))
    personal = json.loads((tmp_path / "state-a" / "personal.json").read_text())
    assert personal["last_round"] == 0


def test_two_clients_at_different_splits_equal_centralized(work, tmp_path):
    clients = [("a", 1, "ort"), ("b", 3, "ort")]
    state = _federate(work, tmp_path, clients)
    order = _order(state)
    assert sorted(order) == sorted([(c, i) for c in ("a", "b") for i in range(STEPS)])
    _check(state, _reference(work, clients, order))
