"""Aggregation maths as free functions over numpy arrays (no torch), tested against numpy.

Layer-wise aggregation across heterogeneous split points (the end of a FlexP-SFL round): for each
block ``j``, the new global adapter is the sample-weighted mean of

- the personal adapters ``θ_k^j`` of the clients whose head holds block ``j`` (``j < s_k``), each
  weighted by its sample count ``n_k``, and
- the server's own ``φ^j``, which the tail trained this round on the activations of the clients
  whose head stops before ``j`` (``s_k <= j``), weighted by the sum of their samples.

Tensors outside every client's head (deeper blocks, the task head) are only trained on the
server and are left as they are.

**U-shaped clients** (``top = u_k`` not None) also hold the last ``u_k`` blocks and the task head
("block" ``L``): the blocks a client holds are ``[0, s_k) ∪ [L - u_k, L]`` (:func:`holds`), and
the server trained block ``j`` for it only when ``s_k <= j < L - u_k`` (its middle). The rule is
the same with "the client's head holds ``j``" read as "the client holds ``j``": block ``j``'s new
``φ^j`` is the sample-weighted mean of the ``θ_k^j`` of every client that holds it and of the
server's ``φ^j`` weighted by the samples of the clients whose ``j`` the server trained. A
head/tail client (``top`` None) leaves the task head and every block past its split to the server.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

__all__ = ["ClientUpdate", "holds", "AGGREGATIONS", "weighted_mean", "coordinate_median", "trimmed_mean", "combine",
           "layerwise_fedavg", "fedavg"]

# How the arrays of one tensor are combined. "mean" weighs by samples; the robust rules do not
# (a sample count is the client's claim) and bound what a minority of bad uploads can move.
AGGREGATIONS = ("mean", "median", "trimmed-mean")
TRIM = 0.2  # trimmed-mean: drop this fraction of values at each end, per coordinate


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """What one client uploaded at the end of a round: the project's one upload type, handed to
    :meth:`~.strategy.Strategy.aggregate` and to the server's ``on_round_end`` callback."""

    params: Mapping[str, np.ndarray]  # canonical name -> tensor (every block it holds, see holds())
    num_samples: int  # n_k: examples it trained on this round
    split: int  # s_k: blocks 0..s_k-1 are on the device
    top: int | None = None  # u_k of a U-shaped client (last u_k blocks + task head on the device); None: head/tail


def holds(j: int, split: int, top: int | None, num_blocks: int) -> bool:
    """Whether a client at ``(split, top)`` holds block ``j`` (0-based; the task head is ``num_blocks``).

    Head/tail (``top`` None): ``j < split``. U-shaped: ``j < split`` or ``j >= num_blocks - top``
    (so the task head always, even with ``top = 0``).
    """
    return j < split or (top is not None and j >= num_blocks - top)


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``Σ w_i a_i / Σ w_i`` in float64, returned as float32. Weights must sum to > 0."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if not total > 0:
        raise ValueError("weighted_mean: weights must sum to a positive number")
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for a, wi in zip(arrays, w):
        acc += wi * np.asarray(a, dtype=np.float64)
    return (acc / total).astype(np.float32)


def coordinate_median(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The per-coordinate median (float64 inside, float32 out): robust to fewer than half bad arrays."""
    return np.median(np.stack([np.asarray(a, np.float64) for a in arrays]), axis=0).astype(np.float32)


def trimmed_mean(arrays: Sequence[np.ndarray], trim: float = TRIM) -> np.ndarray:
    """Per coordinate, the mean after dropping the ``floor(trim * n)`` lowest and highest values."""
    x = np.sort(np.stack([np.asarray(a, np.float64) for a in arrays]), axis=0)
    k = int(trim * len(arrays))
    return x[k : len(arrays) - k].mean(axis=0).astype(np.float32)


def combine(arrays: Sequence[np.ndarray], weights: Sequence[float], rule: str = "mean") -> np.ndarray:
    """One tensor from several by ``rule`` (one of :data:`AGGREGATIONS`); only "mean" uses the weights."""
    if rule == "mean":
        return weighted_mean(arrays, weights)
    if rule == "median":
        return coordinate_median(arrays)
    if rule == "trimmed-mean":
        return trimmed_mean(arrays)
    raise ValueError(f"aggregation {rule!r} is not one of {', '.join(AGGREGATIONS)}")


def layerwise_fedavg(
    global_params: Mapping[str, np.ndarray],
    blocks: Mapping[str, int],
    updates: Sequence[ClientUpdate],
    rule: str = "mean",
    num_blocks: int | None = None,
) -> dict[str, np.ndarray]:
    """New global adapters after one FlexP-SFL round.

    ``global_params``: the server's φ after this round's tail training (canonical name -> array);
    ``blocks``: canonical name -> 0-based block (the task head maps to L); ``updates``: one per
    client that finished the round; ``rule``: how each tensor's arrays are combined (the server's
    φ^j counts as one more array); ``num_blocks``: L, needed when an update is U-shaped (its top
    blocks are counted from L). Returns a new dict; inputs are not modified.
    """
    out = dict(global_params)
    if not updates:
        return out
    if num_blocks is None and any(u.top is not None for u in updates):
        raise ValueError("layerwise_fedavg: U-shaped updates (top set) need num_blocks")
    for name, phi in global_params.items():
        j = blocks[name]
        arrays, weights = [], []
        server_weight = 0
        for u in updates:
            if holds(j, u.split, u.top, num_blocks or 0):
                arrays.append(u.params[name])
                weights.append(u.num_samples)
            else:
                server_weight += u.num_samples
        if not arrays:
            continue  # nobody trained block j on a device: φ^j is the server's alone
        if server_weight:
            arrays.append(phi)
            weights.append(server_weight)
        out[name] = combine(arrays, weights, rule)
    return out


def fedavg(updates: Sequence[tuple[Mapping[str, np.ndarray], int]], rule: str = "mean") -> dict[str, np.ndarray]:
    """Plain FedAvg: every tensor all clients uploaded, combined by ``rule`` (default: sample-weighted mean)."""
    names = updates[0][0].keys()
    return {n: combine([p[n] for p, _ in updates], [k for _, k in updates], rule) for n in names}
