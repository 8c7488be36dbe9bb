"""Device wall time per U-shaped step with the alignment term at the top's input, against without it,
over loopback, measured side by side.

    python -m flexsfl.benchmarks.align_top [--pairs 3] [--steps 10] [--rounds 3] [--split 2] [--top 1] [--lam 0.1] [--pin]

Each run is a real ``flexsfl simulate`` (the server in this process, one ``flexsfl edge run`` client
process over loopback websockets, ORT, one thread each; MiniLM, the demo's data and batch) of a
U-shaped client at ``(--split, --top)`` with λ = ``--lam`` (so the head's term runs in both).
Runs alternate ``--align-top`` off and on ``--pairs`` times, so that load falls on both alike.
Per run, from the client's own round metrics (rounds after the first, whose first step computes
Z' on the critical path): ``step_ms`` (forward() start to backward() end, every wait included),
``roundtrip_ms`` (waiting on the wire), ``align_ms`` (the forwards through φ: off the critical path
in both modes), ``top_ms`` (the top program, plus the term at H with align-top), and the client's
training bytes per step (``bytes_sent`` + ``bytes_received`` over the round, evaluation excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys

from flexsfl.benchmarks.loopback import add_common, apply_pin, client_rows, medians, run_pairs, write_result

__all__ = ["main", "run_one"]

_KEYS = ("step_ms", "roundtrip_ms", "align_ms", "top_ms", "client_compute_ms", "align_top_ratio", "bytes_per_step")


def run_one(out: pathlib.Path, *, align_top: bool, split: int, top: int, steps: int, rounds: int, lam: float,
            seed: int = 0) -> dict:
    from flexsfl.sim.config import DEMO
    from flexsfl.sim.simulate import simulate

    cfg = dataclasses.replace(DEMO, strategy="flexpsfl-u", topology="u", tops=(top,), clients=1, splits=(split,),
                              profiles=None, rounds=rounds, local_steps=steps, align_lambda=lam, align_top=align_top,
                              out=str(out), eval_every=0, max_train=120, max_test=16, seed=seed)
    simulate(cfg, show=False)
    rows = client_rows(out)
    for prev, r in zip(rows, rows[1:]):  # cumulative counters -> this round's training bytes per step
        total = r["bytes_sent"] + r["bytes_received"] - prev["bytes_sent"] - prev["bytes_received"]
        r["bytes_per_step"] = (total - r.get("eval_bytes_sent", 0) - r.get("eval_bytes_received", 0)) / r["steps"]
    rows = rows[1:]
    return {k: statistics.median(r[k] for r in rows) for k in _KEYS if rows and k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(ap, what="off / on", out="results/align_top")
    ap.add_argument("--split", type=int, default=2, help="head blocks on the device (default: 2)")
    ap.add_argument("--top", type=int, default=1, help="top blocks on the device (default: 1)")
    ap.add_argument("--lam", type=float, default=0.1, help="alignment λ in both modes (default: 0.1)")
    args = ap.parse_args(argv)
    if args.rounds < 3 or not args.lam > 0:
        raise SystemExit("error: --rounds must be >= 3 (the first is not counted, bytes need the one before) and --lam > 0")
    apply_pin(args.pin)
    out = pathlib.Path(args.out)
    runs = run_pairs(["off", "on"], args.pairs, lambda name, i: run_one(
        out / f"{name}{i}", align_top=name == "on", split=args.split, top=args.top, steps=args.steps,
        rounds=args.rounds, lam=args.lam), fmt=".4g")
    med = medians(runs)
    ratio, per_pair = write_result(out / "align_top.json", runs, med, "off", "on",
                                   split=args.split, top=args.top, lam=args.lam, pin=args.pin)
    print(f"median device step: align-top {med['on']['step_ms']:.1f} ms vs without {med['off']['step_ms']:.1f} ms: "
          f"{ratio:.3f}x (per pair {', '.join(f'{x:.3f}' for x in per_pair)}); bytes per step "
          f"{med['on']['bytes_per_step']:.0f} vs {med['off']['bytes_per_step']:.0f} "
          f"({med['on']['bytes_per_step'] / med['off']['bytes_per_step']:.3f}x); align_top_ratio {med['on'].get('align_top_ratio', 0):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
