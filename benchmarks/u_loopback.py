"""Device wall time per step, U-shaped against head/tail, over loopback, measured side by side.

    python -m flexsfl.benchmarks.u_loopback [--pairs 3] [--steps 10] [--split 2] [--top 1] [--pin] [--out DIR]

Each run is a real ``flexsfl simulate`` (the server in this process, one ``flexsfl edge run`` client
process over loopback websockets, ORT, one thread each; MiniLM, the demo's data and batch). Runs
alternate head/tail (split ``--split``, the server holds the rest and the labels) and U (split
``--split`` + the last ``--top`` blocks, the final norm and the classifier on the device; the server
holds the middle) ``--pairs`` times, so that load falls on both alike. Both run λ = 0 so that the
topology is the only difference. Per run, from the client's own round metrics (rounds after the
first): ``step_ms`` (the device's wall time per step: forward() start to backward() end, every wait
for the server included), ``roundtrip_ms`` (time spent waiting on the wire: one round trip for
head/tail, two for U), ``top_ms`` (the top program), ``forward_ms``/``backward_ms`` (the head).
``--pin`` puts the server on the last CPU and the device on the first, as when they are two machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys

from flexsfl.benchmarks.loopback import add_common, apply_pin, client_rows, medians, run_pairs, write_result

__all__ = ["main", "run_one"]

_KEYS = ("step_ms", "roundtrip_ms", "forward_ms", "backward_ms", "top_ms", "client_compute_ms")


def run_one(out: pathlib.Path, *, topology: str, split: int, top: int, steps: int, rounds: int, seed: int = 0) -> dict:
    from flexsfl.sim.config import DEMO
    from flexsfl.sim.simulate import simulate

    extra = {"strategy": "flexpsfl-u", "topology": "u", "tops": (top,)} if topology == "u" else {"strategy": "flexpsfl"}
    cfg = dataclasses.replace(DEMO, clients=1, splits=(split,), profiles=None, rounds=rounds, local_steps=steps,
                              align_lambda=0.0, out=str(out), eval_every=0, max_train=120, max_test=16, seed=seed,
                              **extra)
    simulate(cfg, show=False)
    rows = client_rows(out)
    return {k: statistics.median(r[k] for r in rows) for k in _KEYS if rows and k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(ap, what="head/tail / U", out="results/u_loopback")
    ap.add_argument("--split", type=int, default=2, help="head blocks on the device (default: 2)")
    ap.add_argument("--top", type=int, default=1, help="top blocks on the device in U (default: 1)")
    args = ap.parse_args(argv)
    apply_pin(args.pin)
    out = pathlib.Path(args.out)
    runs = run_pairs(["head-tail", "u"], args.pairs, lambda name, i: run_one(
        out / f"{name}{i}", topology=name, split=args.split, top=args.top, steps=args.steps, rounds=args.rounds))
    med = medians(runs)
    ratio, per_pair = write_result(out / "u_loopback.json", runs, med, "head-tail", "u",
                                   split=args.split, top=args.top, pin=args.pin)
    print(f"median device step: U {med['u']['step_ms']:.1f} ms vs head/tail {med['head-tail']['step_ms']:.1f} ms: "
          f"{ratio:.3f}x (per pair {', '.join(f'{x:.3f}' for x in per_pair)}); waiting on the wire "
          f"{med['u']['roundtrip_ms']:.1f} vs {med['head-tail']['roundtrip_ms']:.1f} ms; top {med['u'].get('top_ms', 0):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
