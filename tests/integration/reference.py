"""Shared pieces of the integration tests: bundles, a federation of real processes, and the
eager PyTorch reference the federation must equal."""

from __future__ import annotations

import pathlib

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

from .harness import events, finish, flexsfl, free_port, load_global, rel_err, wait_listening

LR, STEPS, BATCH, LABELS = 0.05, 10, 4, 2


def make_work(tmp_path_factory, tiny_model_dirs, tiny_bundles):
    from flexsfl.sim.data import load_rotten

    root = tmp_path_factory.mktemp("equiv")
    rotten = load_rotten().examples
    data = {}
    for k, cid in enumerate(("a", "b")):
        data[cid] = root / f"{cid}.jsonl"
        write_jsonl(data[cid], rotten[k * 60 : k * 60 + 60])
    return {"root": root, "model": tiny_model_dirs["llama"], "data": data, "bundles": tiny_bundles}


def bundle(work, split: int, backend: str) -> pathlib.Path:
    return work["bundles"]("llama", split, backend, LABELS)


def federate(work, tmp_path, clients: list[tuple[str, int, str]], *, min_clients: int | None = None,
             before_clients=None, extra_env: dict | None = None, register: tuple[str, ...] = ()) -> pathlib.Path:
    """Run one round with these (client id, split, backend); returns the server's state dir.

    ``before_clients(port, procs)`` runs once the server listens, before the clients start (it
    may add processes to ``procs``); ``extra_env`` goes to the client processes.
    """
    root = work["root"]
    reg = tmp_path / "clients.json"
    procs = {}
    from flexsfl.server_backend.clients import add_client

    for cid in [c for c, _, _ in clients] + list(register):
        (tmp_path / f"{cid}.token").write_text(add_client(reg, cid))
    port = free_port()
    state = tmp_path / "state"
    log = tmp_path / "server.log"
    server = flexsfl("serve", "--model", str(work["model"]), "--num-labels", str(LABELS), "--port", str(port),
                     "--clients", str(reg), "--state-dir", str(state), "--rounds", "1", "--local-steps", str(STEPS),
                     "--batch-size", str(BATCH), "--lr", str(LR), "--optimizer", "sgd", "--align-lambda", "0", "--no-batching", "--threads", "1",
                     "--min-clients", str(min_clients or len(clients)), log=log)
    procs["server"] = (server, log)
    wait_listening(port, server, log)
    if before_clients is not None:
        before_clients(port, procs)
    for cid, split, backend in clients:
        clog = tmp_path / f"{cid}.log"
        p = flexsfl("edge", "run", "--bundle", str(bundle(work, split, backend)), "--server", f"ws://127.0.0.1:{port}",
                    "--data", str(work["data"][cid]), "--client-id", cid, "--token-file", str(tmp_path / f"{cid}.token"),
                    "--backend", backend, "--threads", "1", "--state-dir", str(tmp_path / f"state-{cid}"), "--seed", "0",
                    "--max-retries", "3", log=clog, extra_env=extra_env)
        procs[cid] = (p, clog)
    finish(procs, timeout=600)
    return state


def reference(work, clients: list[tuple[str, int, str]], order: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Eager PyTorch: the full HF model, personal head copies per client, the server's tail shared."""
    lm = load_model(str(work["model"]), num_labels=LABELS, attn_implementation="eager")
    names = canonical_names(lm.model)
    params = {names[id(p)]: p for p in lm.model.parameters() if p.requires_grad}
    L = lm.info.num_blocks
    phi = {n: p.detach().clone() for n, p in params.items()}
    init = {n: t.clone() for n, t in phi.items()}
    split = {cid: s for cid, s, _ in clients}
    theta = {cid: {n: phi[n].clone() for n in phi if block_of(n, L) < split[cid]} for cid in split}
    enc = TextEncoder.from_bundle(load_bundle(bundle(work, clients[0][1], clients[0][2])))
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


def check(state: pathlib.Path, reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> None:
    want, init = reference
    got = load_global(state)
    assert set(got) == set(want)
    errs = {n: rel_err(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-4, f"{worst}: rel err {errs[worst]:.2e}"
    # Training moved every tensor, and LoRA B (zero at first) and the task head a lot: the test
    # does not compare two untouched initial states.
    assert all(not np.array_equal(want[n], init[n]) for n in want)
    for n in want:
        if "lora_B" in n or "score" in n or "classifier" in n:
            assert rel_err(want[n], init[n]) > 1e-3 if np.linalg.norm(init[n]) else np.linalg.norm(want[n]) > 1e-4, n


def order(state: pathlib.Path) -> list[tuple[str, int]]:
    out = []
    for e in events(state, "batch"):
        for tag in e["steps"]:
            cid, _, step = tag.split(":")
            out.append((cid, int(step)))
    return out


