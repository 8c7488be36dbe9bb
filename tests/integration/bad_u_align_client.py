"""U-shaped clients that send a bad Z' in an ``--align-top`` round, run as one process by
``test_u_align_bad_input.py``.

``python -m tests.integration.bad_u_align_client PORT BUNDLE TOKEN_DIR OUT.json``

Three registered clients (``x-shape``, ``x-nan``, ``x-eval``) each join round 0 with the bundle's
layout, check that its RoundConfig has ``align_top``, and send one train step written as a raw
frame past the client's own Connection (which would refuse it): Z' of another shape than Z, Z'
with a NaN, or Z' on an eval step. Each records the server's Error (code, message) and the close
code in OUT.json.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import sys

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from flexsfl.core.bundle import load_bundle
from flexsfl.core.wire import Activations, Adapters, Connection, Error, Hello, Role, RoundConfig, parse

CASES = ("shape", "nan", "eval")


async def one(case: str, port: int, bundle, token: str) -> dict:
    m = bundle.manifest
    top = int(m.extra["top"]["blocks"])
    out: dict = {}
    async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        conn = Connection(Role.CLIENT)
        await ws.send(conn.send(Hello(client_id=f"x-{case}", token=token, layout_hash=m.layout_hash, split=m.split, top=top,
                                      backend="bad", encodings=("fp32",))))
        conn.receive(await ws.recv())  # Welcome
        while not isinstance(cfg := conn.receive(await ws.recv()), RoundConfig):
            pass
        out["align_top"] = cfg.align_top
        if cfg.adapters:
            assert isinstance(conn.receive(await ws.recv()), Adapters)
        rng = np.random.default_rng(1)
        z = rng.standard_normal((2, 6, m.model.hidden_size)).astype(np.float32)
        good = Activations(round_id=cfg.round_id, step_id=0, mode="eval" if case == "eval" else "train", z=z,
                           attention_mask=np.ones((2, 6), np.int64), z_ref=z + 0.1, encoding="fp32")
        if case == "shape":  # a frame no honest sender can build: Z' one token short (the message checks on construction)
            object.__setattr__(good, "z_ref", np.ascontiguousarray(good.z_ref[:, :5]))
            frame = good.serialize()
        elif case == "nan":
            frame = bytearray(good.serialize())
            frame[-z.nbytes:-z.nbytes + 4] = struct.pack("<f", math.nan)  # z_ref is the last tensor
            frame = bytes(frame)
        else:
            frame = good.serialize()
        await ws.send(frame)
        try:
            while True:
                msg = parse(await asyncio.wait_for(ws.recv(), 60))
                if isinstance(msg, Error):
                    out.update(code=msg.code.name, message=msg.message)
                else:
                    out.setdefault("other", []).append(type(msg).__name__)
        except ConnectionClosed as e:
            out["close"] = e.rcvd.code if e.rcvd else None
    return out


async def main(port: int, bundle_path: str, token_dir: str, out_path: str) -> None:
    bundle = load_bundle(bundle_path)
    tokens = {c: open(f"{token_dir}/x-{c}.token").read().strip() for c in CASES}
    results = await asyncio.gather(*(one(c, port, bundle, tokens[c]) for c in CASES), return_exceptions=True)
    with open(out_path, "w") as f:
        json.dump({c: (r if isinstance(r, dict) else {"exception": repr(r)}) for c, r in zip(CASES, results)}, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
