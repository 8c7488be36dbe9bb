"""The U-shaped middle batched across clients through the real ComputeWorker queue: several clients'
H, dL/dZ and the middle's weights after equal the one-at-a-time results, under the fixed schedule."""

from __future__ import annotations

import asyncio
import itertools
import threading

import numpy as np
import pytest
import torch

from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_head
from flexsfl.server_backend.compute import ComputeWorker
from flexsfl.server_backend.middle_host import MiddleBackward, MiddleHost, MiddleRequest
from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost
from tests.server_backend.test_middle_host import _perturb
from tests.server_backend.test_tail_host import _batches

CLIENTS = {"a": (1, 1, 2, 9), "b": (2, 0, 3, 6), "c": (1, 1, 2, 11), "d": (1, 2, 2, 7)}  # (split, top, B, T)
# The order the server receives the halves; each line arrives together (one queue run per kind).
SEQUENCE = [
    [("F", "a", 0), ("F", "b", 0), ("F", "c", 0), ("F", "d", 0)],
    [("B", "b", 0), ("B", "a", 0), ("B", "d", 0)],  # backwards in another order than the forwards
    [("F", "a", 1), ("F", "b", 1), ("B", "c", 0), ("F", "d", 1), ("F", "c", 1)],  # kinds mixed: cut into runs
    [("B", "a", 1), ("B", "d", 1), ("B", "b", 1), ("B", "c", 1)],
]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dirs):
    return str(tiny_model_dirs["llama"])


@pytest.fixture(scope="module")
def inputs(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    gen = torch.Generator().manual_seed(7)
    out = {}
    for n, (cid, (s, u, b, t)) in enumerate(CLIENTS.items()):
        for step in (0, 1):
            ids, mask, _ = _batches(1, b=b, t=t, seed=20 + 2 * n + step)[0]
            with torch.no_grad():
                z = build_head(lm, s)(ids, mask).numpy()
            out[cid, step] = (z, mask.numpy(), torch.randn(z.shape, generator=gen).numpy())
    return out


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _run(path, inputs, k: int, recompute: bool, mode: str):
    """The SEQUENCE through a real ComputeWorker one at a time ("alone") or a line at a time
    ("worker": the worker batches what waits, cut at schedule groups), or straight into
    MiddleHost a run of one kind at a time ("direct": one backward_batch may span groups)."""
    lm = load_model(path, num_labels=3)
    _perturb(lm)
    mh = MiddleHost(TailHost(lm, OptimizerConfig("sgd", 0.1, server_step_every=k)), recompute=recompute)
    worker = ComputeWorker(mh.host, threads=1)
    sizes = {"F": [], "B": []}

    def fwd(reqs):
        sizes["F"].append(len(reqs))
        return mh.forward_batch(reqs)

    def bwd(reqs):
        sizes["B"].append(len(reqs))
        return mh.backward_batch(reqs)

    def request(kind, cid, step):
        s, u, *_ = CLIENTS[cid]
        z, mask, gh = inputs[cid, step]
        if kind == "F":
            return MiddleRequest((cid, 0, step), s, u, z, mask)
        return MiddleBackward((cid, 0, step), gh)

    def submit(kind, cid, step):
        if kind == "F":
            return worker.submit(fwd, request(kind, cid, step))
        return worker.submit(bwd, request(kind, cid, step), limit=mh.host.schedule.room)  # as u_round does

    async def go():
        results = {}
        for line in SEQUENCE:
            if mode == "direct":
                for kind, run in itertools.groupby(line, key=lambda e: e[0]):
                    run = list(run)
                    results.update(zip(run, (fwd if kind == "F" else bwd)([request(*e) for e in run])))
                continue
            if mode == "worker":  # all of the line waits in the queue behind a held call
                gate = threading.Event()
                held = asyncio.ensure_future(worker.call(gate.wait))
                await asyncio.sleep(0.05)
                futs = [asyncio.ensure_future(submit(*e)) for e in line]
                await asyncio.sleep(0.05)
                gate.set()
                await held
                outs = await asyncio.gather(*futs)
            else:
                outs = [await submit(*e) for e in line]
            results.update(zip(line, outs))
        await worker.end_round()
        return results

    worker.start()
    try:
        results = asyncio.run(go())
    finally:
        worker.stop()
    return results, mh.host.state(), mh.host.steps, sizes, mh


@pytest.mark.parametrize("k,recompute", [(1, False), (3, False), (3, True), (1, True)])
def test_batched_middle_equals_one_at_a_time(tiny_llama, inputs, k, recompute):
    alone, w_alone, steps_alone, sizes_alone, _ = _run(tiny_llama, inputs, k, recompute, "alone")
    assert set(sizes_alone["F"]) == set(sizes_alone["B"]) == {1}
    assert steps_alone == {1: 8, 3: 3}[k]  # 8 dL/dH: k=3 -> 2 full groups + a partial one at round end
    for mode, want_sizes in (("worker", {"F": [4, 2, 2], "B": {1: [1] * 8, 3: [3, 1, 2, 2]}[k]}),
                             ("direct", {"F": [4, 2, 2], "B": [3, 1, 4]})):
        batched, w_batched, steps_batched, sizes, mh = _run(tiny_llama, inputs, k, recompute, mode)
        # concurrent forwards ran as one batch call per run; backwards per schedule group (worker) or per run
        assert sizes == want_sizes, mode
        assert steps_batched == steps_alone, mode
        for e, want in alone.items():
            got = batched[e]
            arr_w, arr_g = (want.h, got.h) if e[0] == "F" else (want.g, got.g)
            assert arr_w is not None and arr_g is not None, (mode, e)
            assert arr_g.shape == arr_w.shape and _rel(arr_g, arr_w) <= 1e-6, (mode, e)
        for n in w_alone:
            assert _rel(w_batched[n], w_alone[n]) <= 1e-6, (mode, n)
        assert not mh.pending and mh.held_bytes() == 0
