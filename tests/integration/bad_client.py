"""A misbehaving client, run as its own process by the robustness test.

``python bad_client.py PORT CLIENT_ID TOKEN_FILE LAYOUT_HASH SPLIT HIDDEN OUT.json [MODE]``

MODE ``attacks`` (the default): each on a fresh connection, it sends a wrong token, an unknown client, a bundle for another model,
garbage bytes, a text frame, activations with the wrong hidden size, an out-of-order upload and an
oversized frame; then it prints "joined", joins a round with valid credentials and sends NaN
activations. For each it records what the server answered (Error code and message) and the close code, in OUT.json.

The other modes are one registered device misbehaving inside a round (what it may do once it holds
a valid token), each answer recorded in OUT.json the same way:

* ``poison``: at the round's start, an Upload of every adapter filled with 1e30 and
  ``num_samples=2**62``, without training a step.
* ``replay``: round 0, train step 0 (answered), then step 0 again; round 1 (a new connection),
  step id τ (one past the last), then on a third connection of the same round step 2**40.
* ``silent``: joins the round, then says nothing (it keeps the socket open) until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from flexsfl.core.wire import PROTOCOL_VERSION, Activations, Connection, Error, Hello, Role, Upload, parse

MAX = 64 << 20


async def _answer(ws) -> dict:
    """The server's Error (if any) and the close code."""
    out: dict = {}
    try:
        while True:
            data = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(data, bytes):
                msg = parse(data)
                if isinstance(msg, Error):
                    out.update(code=msg.code.name, message=msg.message)
    except ConnectionClosed as e:
        out["close"] = e.rcvd.code if e.rcvd else None
    return out


async def _hello(ws, conn, cid, token, layout, split):
    await ws.send(conn.send(Hello(client_id=cid, token=token, layout_hash=layout, split=split, backend="bad")))
    return conn.receive(await ws.recv())


async def main(port, cid, token, layout, split, hidden, out_path):
    url = f"ws://127.0.0.1:{port}"
    results = {}

    async def attempt(name, hello_kw=None, then=None, raw=None):
        ws = await connect(url, compression=None, max_size=MAX)
        try:
            conn = Connection(Role.CLIENT)
            if raw is not None:
                await ws.send(raw)
            else:
                kw = {"cid": cid, "token": token, "layout": layout, "split": split, **(hello_kw or {})}
                await ws.send(conn.send(Hello(client_id=kw["cid"], token=kw["token"], layout_hash=kw["layout"],
                                              split=kw["split"], backend="bad")))
                if then is not None:
                    conn.receive(await ws.recv())  # Welcome
                    try:
                        await ws.send(then(conn))
                    except ConnectionClosed:
                        pass  # the server may close while a big frame is still going out
            results[name] = await _answer(ws)
        finally:
            try:
                await ws.close()
            except Exception:  # noqa: BLE001 - the server already tore the connection down
                pass

    await attempt("wrong_token", {"token": "not-the-token"})
    await attempt("unknown_client", {"cid": "nobody"})
    await attempt("other_model", {"layout": "0" * 64})
    await attempt("garbage_first", raw=b"\x00garbage\xff" * 10)
    await attempt("text_frame", raw="hello")
    # this protocol version's prefix, then a header length that runs past the frame
    await attempt("garbage_after_hello", then=lambda c: b"FSFL" + bytes([PROTOCOL_VERSION]) + b"\x07\x00\x00\xff\xff\xff\xff")
    wrong = np.zeros((2, 6, hidden + 1), np.float32)

    def wrong_shape(c):
        # eval Activations are allowed between rounds; the hidden size is not this model's
        return c.send(Activations(round_id=0, step_id=0, mode="eval", z=wrong, attention_mask=np.ones((2, 6), np.int64),
                                  encoding=c.encoding))

    await attempt("wrong_shape", then=wrong_shape)

    # An Upload between rounds (serialized directly: our own Connection would refuse to send it)
    await attempt("upload_out_of_order", then=lambda c: Upload(round_id=0, num_samples=1,
                                                                tensors={"x": np.zeros(2, np.float32)}).serialize())
    await attempt("oversized", then=lambda c: b"FSFL" + bytes(MAX // 4))
    # last: join the round for real, then send NaN activations
    print("joined", flush=True)
    async with connect(url, compression=None, max_size=MAX) as ws:
        conn = Connection(Role.CLIENT)
        await _hello(ws, conn, cid, token, layout, split)
        while True:  # RoundConfig, then Adapters
            msg = conn.receive(await ws.recv())
            if type(msg).__name__ == "Adapters":
                break
        z = np.zeros((2, 6, hidden), np.float32)
        frame = bytearray(conn.send(Activations(round_id=msg.round_id, step_id=0, mode="train", z=z,
                                                attention_mask=np.ones((2, 6), np.int64), labels=np.array([0, 1]),
                                                encoding="fp32")))
        # Put a NaN into z's payload after serializing (the codec refuses to encode one): find
        # z's offset from the frame's own header and tensor table.
        header_len = int.from_bytes(frame[8:12], "little")
        table = json.loads(frame[12 : 12 + header_len])["tensors"]
        offset = 12 + header_len
        for t in table:
            if t["name"] == "z":
                break
            offset += t["nbytes"]
        frame[offset : offset + 4] = np.float32("nan").tobytes()
        await ws.send(bytes(frame))
        results["nan_activations"] = await _answer(ws)

    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)


async def _join(url, cid, token, layout, split):
    """Connect, say Hello, wait for the round's RoundConfig and Adapters; returns (ws, conn, RoundConfig, Adapters)."""
    ws = await connect(url, compression=None, max_size=MAX)
    conn = Connection(Role.CLIENT)
    await _hello(ws, conn, cid, token, layout, split)
    cfg = conn.receive(await ws.recv())
    adapters = conn.receive(await ws.recv()) if cfg.adapters else None
    return ws, conn, cfg, adapters


def _step(conn, round_id, step_id, hidden):
    z = np.full((2, 6, hidden), 0.1, np.float32)
    return conn.send(Activations(round_id=round_id, step_id=step_id, mode="train", z=z,
                                 attention_mask=np.ones((2, 6), np.int64), labels=np.array([0, 1]), encoding="fp32"))


async def in_round(mode, port, cid, token, layout, split, hidden, out_path):
    url = f"ws://127.0.0.1:{port}"
    results: dict = {}
    if mode == "poison":
        ws, conn, cfg, adapters = await _join(url, cid, token, layout, split)
        huge = {n: np.full(a.shape, 1e30, np.float32) for n, a in adapters.tensors.items()}
        await ws.send(Upload(round_id=cfg.round_id, num_samples=2**62, tensors=huge).serialize())
        results["poison"] = await _answer(ws)
    elif mode == "replay":
        ws, conn, cfg, _ = await _join(url, cid, token, layout, split)
        await ws.send(_step(conn, cfg.round_id, 0, hidden))
        results["first_step"] = type(conn.receive(await ws.recv())).__name__
        # the same step again: our own Connection would refuse to send it, so serialize it directly
        await ws.send(Activations(round_id=cfg.round_id, step_id=0, mode="train", z=np.full((2, 6, hidden), 0.1, np.float32),
                                  attention_mask=np.ones((2, 6), np.int64), labels=np.array([0, 1])).serialize())
        results["replayed_step"] = await _answer(ws)
        for name, step_id in (("extra_step", None), ("huge_step_id", 2**40)):
            ws, conn, cfg, _ = await _join(url, cid, token, layout, split)
            await ws.send(_step(conn, cfg.round_id, cfg.local_steps if step_id is None else step_id, hidden))
            results[name] = await _answer(ws)
    elif mode == "silent":
        ws, conn, cfg, _ = await _join(url, cid, token, layout, split)
        print("silent in round", cfg.round_id, flush=True)
        results["silent"] = await _answer(ws)  # the server's close when it drops us
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    port, cid, token_file, layout, split, hidden, out, *mode = sys.argv[1:]
    token = open(token_file).read().strip()
    if mode and mode[0] != "attacks":
        asyncio.run(in_round(mode[0], int(port), cid, token, layout, int(split), int(hidden), out))
    else:
        asyncio.run(main(int(port), cid, token, layout, int(split), int(hidden), out))
