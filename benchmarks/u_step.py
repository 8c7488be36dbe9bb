"""U-shaped vs head/tail: bytes per training step on the wire, and the server's memory per client in flight.

``python -m flexsfl.benchmarks.u_step [--model minilm] [--split 2] [--top 1] [--batch 16] [--seq 64]``

Bytes are the real frames' sizes (the messages serialized by the wire codec), per encoding:
head/tail = Activations (Z, mask, labels) + Gradients (dL/dZ); U = Activations (Z, mask) +
MiddleOutput (H) + TopGradients (dL/dH, loss) + Gradients (dL/dZ). Memory is what
:class:`~flexsfl.server_backend.middle_host.MiddleHost` holds for one client's step between H
and dL/dH (:meth:`~.MiddleHost.held_bytes`), with the autograd graph kept (default) and with
``--middle-recompute`` (only Z, the mask and an adapter snapshot), measured on the real model.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from flexsfl.core.wire import ENCODINGS, Activations, Gradients, MiddleOutput, TopGradients

__all__ = ["step_bytes", "middle_memory", "main"]


def step_bytes(b: int, t: int, d: int, encoding: str) -> dict[str, int]:
    """Bytes on the wire per training step (both directions) for a [b, t, d] batch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    mask, labels = np.ones((b, t), np.int64), np.zeros(b, np.int64)
    kw = {"round_id": 1, "step_id": 1, "encoding": encoding}
    up_ht = len(Activations(mode="train", z=x, attention_mask=mask, labels=labels, **kw).serialize())
    up_u = len(Activations(mode="train", z=x, attention_mask=mask, **kw).serialize())
    down = len(Gradients(loss=0.5, g=x, **kw).serialize())
    h = len(MiddleOutput(h=x, **kw).serialize())
    gh = len(TopGradients(loss=0.5, grad_h=x, **kw).serialize())
    return {"head_tail": up_ht + down, "u": up_u + h + gh + down, "u_up": up_u + gh, "u_down": h + down}


def middle_memory(model: str, split: int, top: int, b: int, t: int) -> dict[str, int]:
    """Bytes MiddleHost holds for one in-flight step, per keep mode (needs torch)."""
    from flexsfl.model.loading import load_model
    from flexsfl.server_backend.middle_host import MiddleHost, MiddleRequest
    from flexsfl.server_backend.tail_host import TailHost

    host = TailHost(load_model(model, num_labels=2))
    z = np.random.default_rng(0).standard_normal((b, t, host.info.hidden_size)).astype(np.float32)
    out = {}
    for mode, recompute in (("store", False), ("recompute", True)):
        mh = MiddleHost(host, recompute=recompute)
        (res,) = mh.forward_batch([MiddleRequest(("c", 0, 0), split, top, z, np.ones((b, t), np.int64))])
        assert res.h is not None, res.error
        out[mode] = mh.held_bytes()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexsfl.benchmarks.u_step", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--split", type=int, default=2)
    p.add_argument("--top", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=384, help="d of the model (MiniLM: 384)")
    a = p.parse_args(argv)
    rows = [{"encoding": e, **step_bytes(a.batch, a.seq, a.hidden, e)} for e in ENCODINGS]
    mem = middle_memory(a.model, a.split, a.top, a.batch, a.seq)
    print(json.dumps({"batch": a.batch, "seq": a.seq, "hidden": a.hidden, "bytes_per_step": rows,
                      "middle_held_bytes": {"model": a.model, "split": a.split, "top": a.top, **mem}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
