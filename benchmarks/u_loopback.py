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
import json
import os
import pathlib
import statistics
import sys

from flexsfl.benchmarks.align_overlap import _client_rows, _pin_client_to

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
    rows = _client_rows(out)
    return {k: statistics.median(r[k] for r in rows) for k in _KEYS if rows and k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="head/tail / U run pairs, alternating (default: 3)")
    ap.add_argument("--steps", type=int, default=10, help="local steps per round (default: 10)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is not counted (default: 3)")
    ap.add_argument("--split", type=int, default=2, help="head blocks on the device (default: 2)")
    ap.add_argument("--top", type=int, default=1, help="top blocks on the device in U (default: 1)")
    ap.add_argument("--pin", action="store_true", help="server on the last CPU, the device on the first")
    ap.add_argument("--out", default="results/u_loopback")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("error: --pin needs at least 2 CPUs; run without it")
        os.sched_setaffinity(0, {cpus[-1]})
        _pin_client_to({cpus[0]})
    out = pathlib.Path(args.out)
    runs: dict[str, list[dict]] = {"head-tail": [], "u": []}
    for i in range(args.pairs):
        for topology in runs:
            r = run_one(out / f"{topology}{i}", topology=topology, split=args.split, top=args.top,
                        steps=args.steps, rounds=args.rounds)
            runs[topology].append(r)
            print(f"pair {i} {topology}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    per_pair = [u["step_ms"] / h["step_ms"] for h, u in zip(runs["head-tail"], runs["u"])]
    ratio = med["u"]["step_ms"] / med["head-tail"]["step_ms"]
    print(f"median device step: U {med['u']['step_ms']:.1f} ms vs head/tail {med['head-tail']['step_ms']:.1f} ms: "
          f"{ratio:.3f}x (per pair {', '.join(f'{x:.3f}' for x in per_pair)}); waiting on the wire "
          f"{med['u']['roundtrip_ms']:.1f} vs {med['head-tail']['roundtrip_ms']:.1f} ms; top {med['u'].get('top_ms', 0):.1f} ms")
    (out / "u_loopback.json").write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio, "per_pair": per_pair,
                                                     "split": args.split, "top": args.top, "pin": args.pin},
                                                    indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
