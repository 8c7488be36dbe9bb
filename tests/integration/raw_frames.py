"""What the misbehaving clients of the integration tests share: joining a round with a registered
token, frames no honest sender can build, and recording how the server answered.

A misbehaving client sends frames past its own :class:`Connection` (which would refuse them) and
records the server's :class:`Error` (code, message), any other message, and the close code, so the
test can assert the one-line error and that everyone else kept training.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct

import numpy as np
from websockets.exceptions import ConnectionClosed

from flexsfl.core.wire import Adapters, Connection, Error, Hello, RoundConfig, parse

__all__ = ["join_round", "answer", "nan_in_last_tensor", "bad_z_ref_frame", "run_cases"]


async def join_round(ws, conn: Connection, manifest, client_id: str, token: str, top: int | None = None) -> RoundConfig:
    """Hello with the bundle's layout, then wait for the round's RoundConfig (and its Adapters, if any)."""
    await ws.send(conn.send(Hello(client_id=client_id, token=token, layout_hash=manifest.layout_hash, split=manifest.split,
                                  top=top, backend="bad", encodings=("fp32",))))
    conn.receive(await ws.recv())  # Welcome
    while not isinstance(cfg := conn.receive(await ws.recv()), RoundConfig):
        pass
    if cfg.adapters:
        assert isinstance(conn.receive(await ws.recv()), Adapters)
    return cfg


async def answer(ws, timeout: float = 60) -> dict:
    """Everything the server says until it closes: ``code``/``message`` of its Error, ``other`` message types, ``close``."""
    out: dict = {}
    try:
        while True:
            msg = parse(await asyncio.wait_for(ws.recv(), timeout))
            if isinstance(msg, Error):
                out.update(code=msg.code.name, message=msg.message)
            else:
                out.setdefault("other", []).append(type(msg).__name__)
    except ConnectionClosed as e:
        out["close"] = e.rcvd.code if e.rcvd else None
    return out


def nan_in_last_tensor(frame: bytes, nbytes: int) -> bytes:
    """``frame`` with the first float32 of its last tensor (``nbytes`` long) set to NaN: a poisoned
    tensor that the message's own constructor would never have let through."""
    out = bytearray(frame)
    out[-nbytes:-nbytes + 4] = struct.pack("<f", math.nan)
    return bytes(out)


def bad_z_ref_frame(case: str, step) -> bytes:
    """The frame of an Activations ``step`` that carries Z' (its last tensor), spoiled for ``case``:
    ``shape``, Z' one token short (a frame no honest sender can build: the message checks on
    construction); ``nan``, a NaN in Z'; any other case, the step as it is."""
    if case == "shape":
        object.__setattr__(step, "z_ref", np.ascontiguousarray(step.z_ref[:, :5]))
        return step.serialize()
    if case == "nan":
        return nan_in_last_tensor(step.serialize(), step.z_ref.nbytes)
    return step.serialize()


async def run_cases(cases, one, token_dir: str, out_path: str) -> None:
    """Run ``one(case, token)`` for every case at once (client ``x-<case>``, its token from
    ``token_dir``) and write each case's answer (or the exception it raised) to ``out_path``."""
    tokens = {c: open(f"{token_dir}/x-{c}.token").read().strip() for c in cases}
    results = await asyncio.gather(*(one(c, tokens[c]) for c in cases), return_exceptions=True)
    with open(out_path, "w") as f:
        json.dump({c: (r if isinstance(r, dict) else {"exception": repr(r)}) for c, r in zip(cases, results)}, f, indent=1)
