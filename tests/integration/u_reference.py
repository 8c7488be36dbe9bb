"""Shared pieces of the U-shaped integration tests: ``--top`` bundles, a federation of real
processes (``flexsfl serve`` + ``flexsfl edge run``), a frame-recording websocket proxy, and the
eager PyTorch reference a U-shaped federation must equal.

The reference replays the server's own log: each ``u_forward`` event is a client's step seen by
the middle (the full model runs with that client's personal head and top and the global middle
as it is *then*; the device applies its head and top gradients), each ``batch`` event is the
middle's optimizer step with the gradient of that forward. So a dL/dH answered after another
client's step is modelled exactly as the server's snapshot makes it.

With ``align = λ > 0`` the reference also applies the alignment terms of an ``--align-top``
federation, as tensor hooks on the full model's hidden states: at H (the top's input) the
gradient becomes ``g + λ‖g‖·a/‖a‖`` with ``a = ∂/∂H`` of the per-sequence mean
``KL(softmax(H') || softmax(H))``, and likewise at Z (the head's output) with Z'; Z' and H' come
from the global path (the head as sent at the round's start, the middle as it is then), the KL
written here in torch independently of the device's numpy. The *direction* ``a`` is that of two
nearly equal float32 outputs (‖Z − Z'‖/‖Z'‖ ~ 1e-6..1e-4 in the first steps from θ = φ), so one
ulp of difference between ONNX Runtime's and eager PyTorch's Z moves it by up to percents. Given
``wire`` (what the recording proxy saw: the device's Z, Z' and the server's H, H' per step), the
hooks take ``a`` and the 1e-6 gap rule from those values, as the device did; the reference still
checks that they equal its own eager Z, Z', H, H' (rel err <= 1e-4), and everything else — ``g``,
the middle's backward, both optimizers, aggregation — is eager.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading

import numpy as np
import torch

from flexsfl.core.bundle import load_bundle
from flexsfl.edge_runtime.data import read_examples, write_jsonl
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.edge_runtime.trainer import BatchCursor
from flexsfl.model.loading import load_model
from flexsfl.model.partition import block_of, canonical_names, task_loss
from flexsfl.server_backend.aggregation import ClientUpdate, holds, layerwise_fedavg

from .harness import finish, flexsfl, free_port, load_global, rel_err, wait_listening

__all__ = ["LR", "STEPS", "BATCH", "LABELS", "make_data", "u_bundles", "federate_u", "replay", "reference_u", "check_u", "Recorder",
           "align_hook", "wire_steps"]

LR, STEPS, BATCH, LABELS = 0.05, 10, 4, 2


def make_data(root: pathlib.Path, ids=("a", "b")) -> dict[str, pathlib.Path]:
    from flexsfl.sim.data import load_rotten

    rotten = load_rotten().examples
    data = {}
    for k, cid in enumerate(ids):
        data[cid] = root / f"{cid}.jsonl"
        write_jsonl(data[cid], rotten[k * 60: k * 60 + 60])
    return data


def u_bundles(root: pathlib.Path, models: dict):
    """``get(family, split, top, backend)``: a ``--top`` bundle, exported once and shared."""
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    made: dict = {}

    def get(family: str, split: int, top: int, backend: str) -> pathlib.Path:
        key = (family, split, top, backend)
        if key not in made:
            out = root / f"{family}-s{split}-u{top}-{backend}"
            export_bundle(ExportConfig(model=str(models[family]), split=split, top=top, out=str(out), backend=backend,
                                       num_labels=LABELS, max_batch=8, max_seq=48, ort_training_artifacts=False),
                          progress=False)
            made[key] = out
        return made[key]

    return get


def federate_u(model: pathlib.Path, data: dict, tmp_path: pathlib.Path, clients: list[tuple[str, pathlib.Path, str]], *,
               serve_args: tuple[str, ...] = (), extra_env: dict | None = None, port: int | None = None,
               server_port: int | None = None, min_clients: int | None = None, before_clients=None,
               register: tuple[str, ...] = (), test_data: pathlib.Path | None = None) -> pathlib.Path:
    """One round with these (client id, bundle, backend); returns the server's state dir.

    ``port``: where the clients connect (a proxy in front of ``server_port``), default the server's."""
    from flexsfl.server_backend.clients import add_client

    reg = tmp_path / "clients.json"
    for cid in [c for c, _, _ in clients] + list(register):
        (tmp_path / f"{cid}.token").write_text(add_client(reg, cid))
    server_port = server_port or free_port()
    state, log = tmp_path / "state", tmp_path / "server.log"
    server = flexsfl("serve", "--model", str(model), "--num-labels", str(LABELS), "--port", str(server_port),
                     "--clients", str(reg), "--state-dir", str(state), "--rounds", "1", "--local-steps", str(STEPS),
                     "--batch-size", str(BATCH), "--lr", str(LR), "--optimizer", "sgd", "--align-lambda", "0", "--no-batching", "--threads", "1",
                     "--min-clients", str(min_clients or len(clients)), *serve_args, log=log)
    procs = {"server": (server, log)}
    wait_listening(server_port, server, log)
    if before_clients is not None:
        before_clients(server_port, procs)
    for cid, bundle, backend in clients:
        clog = tmp_path / f"{cid}.log"
        p = flexsfl("edge", "run", "--bundle", str(bundle), "--server", f"ws://127.0.0.1:{port or server_port}",
                    "--data", str(data[cid]), "--client-id", cid, "--token-file", str(tmp_path / f"{cid}.token"),
                    "--backend", backend, "--threads", "1", "--state-dir", str(tmp_path / f"state-{cid}"), "--seed", "0",
                    "--max-retries", "3", *(("--test-data", str(test_data)) if test_data else ()), log=clog,
                    extra_env=extra_env)
        procs[cid] = (p, clog)
    finish(procs, timeout=900)
    return state


def replay(state: pathlib.Path) -> list[tuple[str, str, int]]:
    """The server's U-shaped log in file order: ("forward" | "step", client, step id)."""
    import json

    out = []
    for line in (state / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "u_forward":
            out.append(("forward", e["client"], e["step"]))
        elif e["event"] == "batch":
            for tag in e["steps"]:
                cid, _, step = tag.split(":")
                out.append(("step", cid, int(step)))
    return out


def align_hook(x_ref: torch.Tensor, mask: torch.Tensor, lam: float, at: torch.Tensor | None = None):
    """A tensor hook for ``x`` (Z or H): the upstream gradient ``g`` -> ``g + λ‖g‖·a/‖a‖``,
    ``a = ∂/∂x`` of the per-sequence mean KL(softmax(x_ref) || softmax(x)) over real tokens (taken
    at ``at`` instead of ``x`` when given: the device's own X); ``g`` itself when the outputs agree
    to float32 rounding (relative gap < 1e-6), as on the device."""
    m = mask.double()
    w = m / m.sum(1, keepdim=True).clamp(min=1.0) / x_ref.shape[0]  # [B, T]: each sequence weighs the same
    log_q = torch.log_softmax(x_ref.double(), -1)

    def hook(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # hooks run inside backward, where grad mode is off
            xd = (x if at is None else at).detach().double().requires_grad_(True)
            kl = (log_q.exp() * (log_q - torch.log_softmax(xd, -1))).sum(-1)
            (a,) = torch.autograd.grad((kl * w).sum(), xd)
        gap = float(((xd.detach() - x_ref.double()) * m[..., None]).norm() / (x_ref.double() * m[..., None]).norm())
        if gap < 1e-6 or float(a.norm()) <= 1e-300:
            return g
        return g + (lam * g.double().norm() / a.norm() * a).to(g.dtype)

    return hook


def reference_u(model: pathlib.Path, data: dict, layout: dict[str, tuple[int, int]], bundle: pathlib.Path,
                log: list[tuple[str, str, int]], *, align: float = 0.0, wire: dict | None = None):
    """Eager PyTorch over the full HF model: personal heads and tops per client, the global middle
    stepped in the server's order; ``align`` > 0: the alignment terms at Z and H (``--align-top``),
    ``wire``: ``(client, step) -> {"z", "z_ref", "h", "h_ref"}`` as sent (:func:`wire_steps`).
    Returns (global after aggregation, personal θ per client, initial φ)."""
    lm = load_model(str(model), num_labels=LABELS, attn_implementation="eager")
    names = canonical_names(lm.model)
    params = {names[id(p)]: p for p in lm.model.parameters() if p.requires_grad}
    L = lm.info.num_blocks
    blocks = {n: block_of(n, L) for n in params}
    phi = {n: p.detach().clone() for n, p in params.items()}
    init = {n: t.clone() for n, t in phi.items()}
    theta = {c: {n: phi[n].clone() for n in phi if holds(blocks[n], s, u, L)} for c, (s, u) in layout.items()}
    enc = TextEncoder.from_bundle(load_bundle(bundle))
    cursors = {c: BatchCursor(read_examples(data[c]), 0) for c in layout}
    samples = {c: 0 for c in layout}
    waiting: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for kind, cid, step in log:
        if cid not in layout:
            continue  # a refused client's step: it must not have reached the model (checked by the caller)
        if kind == "step":
            for n, g in waiting.pop((cid, step)).items():
                phi[n] = phi[n] - LR * g
            continue
        batch = cursors[cid].next(BATCH)
        samples[cid] += len(batch)
        tok = enc.encode([e.text for e in batch])
        ids, mask = torch.from_numpy(tok.input_ids), torch.from_numpy(tok.attention_mask)
        s, u = layout[cid]
        if align:  # the global path: the head as sent at the round's start (one round: φ0), the middle now
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(init[n] if blocks[n] < s else phi[n])
                ref = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[cid][n] if n in theta[cid] else phi[n])
        for p in params.values():
            p.grad = None
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(align))
        if align:  # hidden_states[k]: the input of block k (Z = [s], H = [L - u])
            hs = out.hidden_states
            sent = wire[cid, step] if wire is not None else {}
            for k, name in ((s, "z"), (L - u, "h")):
                at, x_ref = None, ref[k]
                if sent:  # the device's X and X': they must be what eager computes, to float32 rounding
                    at, x_ref = (torch.from_numpy(np.array(sent[n], np.float32)) for n in (name, f"{name}_ref"))
                    for mine, theirs, what in ((hs[k], at, name), (ref[k], x_ref, f"{name}_ref")):
                        err = rel_err(theirs.numpy(), mine.detach().numpy())
                        assert err <= 1e-4, f"{cid} step {step}: the wire's {what} differs from eager's by {err:.1e}"
                hook = align_hook(x_ref, mask, align, at)
                x = hs[k]
                x.register_hook(lambda g, x=x, hook=hook: hook(g, x))
        logits = out.logits
        task_loss(logits, torch.tensor([e.label for e in batch]), "seq_cls").backward()
        with torch.no_grad():
            for n, p in params.items():
                if n in theta[cid]:
                    theta[cid][n] = theta[cid][n] - LR * p.grad
        waiting[cid, step] = {n: p.grad.clone() for n, p in params.items() if n not in theta[cid]}
    assert not waiting, f"forwards without their step: {sorted(waiting)}"
    ups = [ClientUpdate({n: t.numpy() for n, t in theta[c].items()}, samples[c], s, u) for c, (s, u) in layout.items()]
    final = layerwise_fedavg({n: t.numpy() for n, t in phi.items()}, blocks, ups, num_blocks=L)
    return final, {c: {n: t.numpy() for n, t in th.items()} for c, th in theta.items()}, {n: t.numpy() for n, t in init.items()}


def wire_steps(rec: "Recorder") -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """``(client, step) -> {"z", "z_ref", "h", "h_ref"}`` of every align_top train step the proxy saw."""
    from flexsfl.core.wire import Activations, Hello, Limits, MiddleOutput, parse

    lim, out = Limits(max_frame_bytes=1 << 30), {}
    for up, down in rec.sessions:
        msgs = [parse(f, lim) for f in up]
        cid = next(m.client_id for m in msgs if isinstance(m, Hello))
        for m in msgs:
            if isinstance(m, Activations) and m.z_ref is not None:
                out.setdefault((cid, m.step_id), {}).update(z=m.z, z_ref=m.z_ref)
        for m in (parse(f, lim) for f in down):
            if isinstance(m, MiddleOutput) and m.h_ref is not None:
                out.setdefault((cid, m.step_id), {}).update(h=m.h, h_ref=m.h_ref)
    return out


def check_u(state: pathlib.Path, ref, tol: float = 1e-4) -> dict[str, float]:
    """Global and every personal upload equal the reference (rel err <= tol); returns the worst errors."""
    from safetensors.numpy import load_file

    want, personal, init = ref
    got = load_global(state)
    assert set(got) == set(want)
    worst = {}
    for what, g, w in [("global", got, want)] + [(f"personal/{c}", load_file(str(state / "personal" / f"{c}.safetensors")), p)
                                                  for c, p in personal.items()]:
        assert set(g) == set(w), what
        errs = {n: rel_err(g[n], w[n]) for n in w}
        n = max(errs, key=errs.get)
        assert errs[n] <= tol, f"{what} {n}: rel err {errs[n]:.2e}"
        worst[what] = errs[n]
    # Training moved LoRA B (zero at first) and the task head: not two untouched initial states.
    for c, p in personal.items():
        for n, a in p.items():
            if "lora_B" in n or "classifier" in n or "score" in n:
                assert not np.allclose(a, init[n]), f"{c} {n} did not train"
    return worst


class Recorder:
    """A websocket proxy on loopback that forwards frames both ways and records every frame the
    server receives (the client's, byte for byte, in ``frames``) and every frame it sends
    (``replies``). Runs on its own thread; ``stop()`` ends it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.frames: list[bytes] = []
        self.replies: list[bytes] = []
        self.sessions: list[tuple[list[bytes], list[bytes]]] = []  # per connection: (frames up, frames down)
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the recording proxy did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.asyncio.server import serve
        from websockets.exceptions import ConnectionClosed

        async def pipe(src, dst, record: list, mine: list) -> None:
            try:
                async for data in src:
                    data = data if isinstance(data, bytes) else data.encode()
                    record.append(data)
                    mine.append(data)
                    await dst.send(data)
            except ConnectionClosed:
                pass
            finally:
                await dst.close()

        async def handle(client) -> None:
            try:
                up = await connect(f"ws://127.0.0.1:{self.upstream}", compression=None, max_size=None)
            except OSError:
                await client.close(1013)
                return
            self.sessions.append(((ups := []), (downs := [])))
            await asyncio.gather(pipe(client, up, self.frames, ups), pipe(up, client, self.replies, downs))

        self._stop = asyncio.Event()
        async with serve(handle, "127.0.0.1", self.port, compression=None, max_size=None):
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
