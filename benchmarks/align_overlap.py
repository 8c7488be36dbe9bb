"""Device wall time per step with the alignment term on (λ > 0) against off (λ = 0), over loopback.

    python -m flexsfl.benchmarks.align_overlap [--pairs 3] [--steps 12] [--split 3] [--out results/align_overlap]

Each run is a real ``flexsfl simulate`` (server with MiniLM's tail in this process, the client a
separate ``flexsfl edge run`` process over loopback websockets, ORT, one thread each), one
client pinned at ``--split``, the demo's data and batch. Runs alternate λ = 0.1 / λ = 0 ``--pairs``
times so that load on the machine falls on both alike. Per run, from the client's own round
metrics (``server/metrics.jsonl``, rounds after the first, whose first steps warm up):
``step_ms`` (forward() start to backward() end: the device's wall time per step, the wait for the
server included), ``align_ms`` (the Z' forward through φ, which now runs while the device waits),
``roundtrip_ms`` (Z sent to g received) and ``forward_ms``/``backward_ms``. Prints the medians
and the ratio step(λ>0)/step(λ=0); with the Z' forward on the critical path (before this change)
a λ > 0 step would take about ``align_ms`` longer.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys

from flexsfl.benchmarks.loopback import add_common, apply_pin, client_rows, medians, run_pairs, write_result

__all__ = ["main", "run_pair"]

_KEYS = ("step_ms", "align_ms", "roundtrip_ms", "forward_ms", "backward_ms", "aligned_steps")


def run_pair(out: pathlib.Path, *, split: int, steps: int, rounds: int, lam: float, seed: int = 0) -> dict:
    from flexsfl.sim.config import DEMO
    from flexsfl.sim.simulate import simulate

    cfg = dataclasses.replace(DEMO, clients=1, splits=(split,), profiles=None, rounds=rounds, local_steps=steps,
                              align_lambda=lam, out=str(out), eval_every=0, max_train=120, max_test=16, seed=seed)
    simulate(cfg, show=False)
    rows = client_rows(out)
    return {k: statistics.median(r[k] for r in rows) for k in _KEYS if rows and k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(ap, what="λ>0 / λ=0", out="results/align_overlap", steps=12)
    ap.add_argument("--split", type=int, default=3, help="the client's split point (default: 3)")
    ap.add_argument("--lam", type=float, default=0.1, help="λ of the aligned runs (default: 0.1)")
    args = ap.parse_args(argv)
    apply_pin(args.pin)
    out = pathlib.Path(args.out)
    lams = {"on": args.lam, "off": 0.0}
    runs = run_pairs(list(lams), args.pairs, lambda name, i: run_pair(
        out / f"{name}{i}", split=args.split, steps=args.steps, rounds=args.rounds, lam=lams[name]))
    med = medians(runs)
    ratio, per_pair = write_result(out / "align_overlap.json", runs, med, "off", "on")
    print(f"median step_ms λ>0 {med['on']['step_ms']:.1f} vs λ=0 {med['off']['step_ms']:.1f}: {ratio:.3f}x "
          f"(per pair {', '.join(f'{x:.3f}' for x in per_pair)}); Z' forward {med['on']['align_ms']:.1f} ms off the "
          f"critical path, server round trip {med['on']['roundtrip_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
