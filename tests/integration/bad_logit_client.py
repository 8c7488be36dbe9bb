"""Head/tail clients that send a bad Z' in a ``--align logit-kl`` round, run as one process by
``test_logit_align.py``.

``python -m tests.integration.bad_logit_client PORT BUNDLE TOKEN_DIR OUT.json``

Four registered clients (``x-shape``, ``x-nan``, ``x-missing``, ``x-eval``) each join round 0 with
the bundle's layout, check that its RoundConfig aligns at the logits, and send one step written
as a raw frame past the client's own Connection (which would refuse it): Z' one token shorter
than Z, Z' with a NaN, a train step without Z', or Z' on an eval step. Each records the server's
Error (code, message) and the close code in OUT.json.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
from websockets.asyncio.client import connect

from flexsfl.core.bundle import load_bundle
from flexsfl.core.wire import Activations, Connection, Role

from tests.integration.raw_frames import answer, bad_z_ref_frame, join_round, run_cases

CASES = ("shape", "nan", "missing", "eval")


async def one(case: str, port: int, bundle, token: str) -> dict:
    m = bundle.manifest
    async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        conn = Connection(Role.CLIENT)
        cfg = await join_round(ws, conn, m, f"x-{case}", token, -1)
        z = np.random.default_rng(1).standard_normal((2, 6, m.model.hidden_size)).astype(np.float32)
        good = Activations(round_id=cfg.round_id, step_id=0, mode="eval" if case == "eval" else "train", z=z,
                           attention_mask=np.ones((2, 6), np.int64), labels=np.array([0, 1]),
                           z_ref=None if case == "missing" else z + 0.1, encoding="fp32")
        frame = bad_z_ref_frame(case, good)
        await ws.send(frame)
        return {"alignment": cfg.alignment, **await answer(ws)}


async def main(port: int, bundle_path: str, token_dir: str, out_path: str) -> None:
    bundle = load_bundle(bundle_path)
    await run_cases(CASES, lambda case, token: one(case, port, bundle, token), token_dir, out_path)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
