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
import json
import os
import pathlib
import statistics
import sys

__all__ = ["main", "run_pair"]

_KEYS = ("step_ms", "align_ms", "roundtrip_ms", "forward_ms", "backward_ms", "aligned_steps")


def _client_rows(out: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines() if line]
    return [r["metrics"] for r in rows if r.get("event") == "client_metrics" and r.get("round", 0) > 0]


def _pin_client_to(cpus: set[int]) -> None:
    """Spawned ``flexsfl edge run`` processes go on ``cpus``: the device's own core, as on real hardware."""
    from flexsfl.sim import simulate as sim

    spawn = getattr(sim._spawn_client, "__wrapped__", sim._spawn_client)

    def pinned(*args, **kwargs):
        proc = spawn(*args, **kwargs)
        os.sched_setaffinity(proc.pid, cpus)
        return proc

    pinned.__wrapped__ = spawn
    sim._spawn_client = pinned


def run_pair(out: pathlib.Path, *, split: int, steps: int, rounds: int, lam: float, seed: int = 0) -> dict:
    from flexsfl.sim.config import DEMO
    from flexsfl.sim.simulate import simulate

    cfg = dataclasses.replace(DEMO, clients=1, splits=(split,), profiles=None, rounds=rounds, local_steps=steps,
                              align_lambda=lam, out=str(out), eval_every=0, max_train=120, max_test=16, seed=seed)
    simulate(cfg, show=False)
    rows = _client_rows(out)
    return {k: statistics.median(r[k] for r in rows) for k in _KEYS if rows and k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="λ>0 / λ=0 run pairs, alternating (default: 3)")
    ap.add_argument("--steps", type=int, default=12, help="local steps per round (default: 12)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is not counted (default: 3)")
    ap.add_argument("--split", type=int, default=3, help="the client's split point (default: 3)")
    ap.add_argument("--lam", type=float, default=0.1, help="λ of the aligned runs (default: 0.1)")
    ap.add_argument("--out", default="results/align_overlap")
    ap.add_argument("--pin", action="store_true",
                    help="server on the last CPU, the device process on the first (a device and a server that do not "
                         "share cores, as deployed; needs ≥ 2 CPUs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("error: --pin needs at least 2 CPUs; run without it")
        os.sched_setaffinity(0, {cpus[-1]})
        _pin_client_to({cpus[0]})
    out = pathlib.Path(args.out)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for i in range(args.pairs):
        for name, lam in (("on", args.lam), ("off", 0.0)):
            r = run_pair(out / f"{name}{i}", split=args.split, steps=args.steps, rounds=args.rounds, lam=lam)
            runs[name].append(r)
            print(f"pair {i} λ={lam}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratio = med["on"]["step_ms"] / med["off"]["step_ms"]
    per_pair = [a["step_ms"] / b["step_ms"] for a, b in zip(runs["on"], runs["off"])]
    print(f"median step_ms λ>0 {med['on']['step_ms']:.1f} vs λ=0 {med['off']['step_ms']:.1f}: {ratio:.3f}x "
          f"(per pair {', '.join(f'{x:.3f}' for x in per_pair)}); Z' forward {med['on']['align_ms']:.1f} ms off the "
          f"critical path, server round trip {med['on']['roundtrip_ms']:.1f} ms")
    (out / "align_overlap.json").write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio, "per_pair": per_pair},
                                                       indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
