"""U-shaped clients that send a bad dL/dH, run as one process by ``test_u_bad_input.py``.

``python -m tests.integration.bad_u_client PORT BUNDLE TOKEN_DIR TTL OUT.json``

Four registered clients (``x-shape``, ``x-nan``, ``x-unknown``, ``x-late``) each join round 0
with the bundle's layout, send a valid train Activations (step 0, no labels), receive the
middle's H, and then answer with a bad TopGradients, written as raw frames past the client's
own Connection (which would refuse them): dL/dH of the wrong shape, with a NaN, for a step that
was never sent, or a valid one after the middle's deadline (TTL seconds, +2.5). A fifth
(``x-zref``) sends its step with Z' (``z_ref``), which a round without ``align_top`` refuses. Each client
records the server's Error (code, message) and the close code in OUT.json.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
from websockets.asyncio.client import connect

from flexsfl.core.bundle import load_bundle
from flexsfl.core.wire import Activations, Connection, MiddleOutput, Role, TopGradients

from tests.integration.raw_frames import answer, join_round, nan_in_last_tensor, run_cases

CASES = ("shape", "nan", "unknown", "late", "zref")


async def one(case: str, port: int, bundle, token: str, ttl: float) -> dict:
    m = bundle.manifest
    async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        conn = Connection(Role.CLIENT)
        cfg = await join_round(ws, conn, m, f"x-{case}", token, int(m.extra["top"]["blocks"]))
        z = np.random.default_rng(1).standard_normal((2, 6, m.model.hidden_size)).astype(np.float32)
        if case == "zref":  # Z' in a round without align_top, as a raw frame (the client's own Connection refuses it)
            frame = Activations(round_id=cfg.round_id, step_id=0, mode="train", z=z, attention_mask=np.ones((2, 6), np.int64),
                                z_ref=z + 0.1, encoding="fp32").serialize()
        else:
            await ws.send(conn.send(Activations(round_id=cfg.round_id, step_id=0, mode="train", z=z,
                                                attention_mask=np.ones((2, 6), np.int64), encoding="fp32")))
            h = conn.receive(await ws.recv())
            assert isinstance(h, MiddleOutput), h
            good = TopGradients(round_id=cfg.round_id, step_id=0, loss=0.7, grad_h=np.full(z.shape, 1e-3, np.float32))
            if case == "shape":
                frame = TopGradients(round_id=cfg.round_id, step_id=0, loss=0.7, grad_h=np.zeros((2, 5, z.shape[2]), np.float32)).serialize()
            elif case == "nan":
                frame = nan_in_last_tensor(good.serialize(), z.nbytes)
            elif case == "unknown":
                frame = TopGradients(round_id=cfg.round_id, step_id=5, loss=0.7, grad_h=good.grad_h).serialize()
            else:
                await asyncio.sleep(ttl + 2.5)
                frame = good.serialize()
        await ws.send(frame)
        return await answer(ws)


async def main(port: int, bundle_path: str, token_dir: str, ttl: float, out_path: str) -> None:
    bundle = load_bundle(bundle_path)
    await run_cases(CASES, lambda case, token: one(case, port, bundle, token, ttl), token_dir, out_path)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]))
