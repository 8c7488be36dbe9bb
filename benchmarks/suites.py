"""The accuracy suites of ``flexsfl bench accuracy --suite NAME``: tasks where personalization matters.

Each :class:`Suite` fixes everything but the seed (clients, device profiles and so splits, rounds,
local steps, batch, sequence length, learning rate, ≥ 200 test examples per client), and names the
strategies it runs by default. A seed re-partitions the data (the Dirichlet draw and the train/test
split), re-initializes the server's model (which every strategy sends its clients at the first
round) and reorders each client's batches; seed s of every strategy sees the same partition, so
the strategies can be compared seed by seed (:mod:`flexsfl.benchmarks.stats`).

- ``supersense-a0.1``, ``supersense-a0.5``: WordNet noun glosses -> the 10 most frequent
  supersenses (:mod:`flexsfl.sim.data.wordnet`), label skew by the project's Dirichlet
  partitioner at the α named (0.1: most clients hold 2–4 classes; 0.5: most classes, unevenly).
- ``domains``: VADER's 4 natural domains (tweets, movie, Amazon and NYT snippets), one per
  client: the demo's domain shift, binary sentiment.
- ``lm``: SmolLM2 fine-tuned on each device's own VADER domain (the LM demo's model and data), scored
  by perplexity (lower is better) on each client's own held-out texts and, for generalization, on the
  other clients'; the LM demo's budget (2 rounds × τ = 6 of B = 4, T ≤ 32), :data:`LM_TEST` test
  texts per client (the server scores ~20 × that many SmolLM2 texts a run, the devices 4 × that
  many in every :data:`LM_SCORE_EVERY`-th round and the last), pinned :data:`LM_SPLITS`. It runs
  :data:`LM_RUNS` (U-shaped with one top block, :data:`LM_RUN_CONFIG`); :data:`LM_UNSUITED` says why not the others.

Every suite has the demo's 4 devices (rpi4, rpi4, rpi5, jetson-orin: the planner picks their
splits) and is sized for a shared 2-core machine: MiniLM, T ≤ 48, 10 rounds × τ = 10 steps of
B = 8 (two passes over ≤ 400 training examples per client; the report says how much each run
still gains per 3 rounds at the trend of its last third, :func:`~flexsfl.benchmarks.suite_report.plateau`: at
this budget the split strategies still gain, the whole-model ones much more — not a plateau), exactly
200 test examples per client. The clients run as tasks of the
benchmark's process (``in_process``: the same websocket transport on loopback, without six
interpreters starting under load), so wall time here is not a device's: the device clock is the
time axis. Exports are reused across seeds and strategies (``bundle_seed`` 0: the server's seeded
model replaces a bundle's new weights at the first round). Evaluation happens where the tables and
the plot need it: the clients score their own test split every round (the curves); the server
scores the global model and each personal model on the union test set after the last round only.
"""

from __future__ import annotations

import dataclasses

from flexsfl.sim.config import SimConfig

__all__ = ["Suite", "SUITES", "SUITE_RUNS", "LM_RUNS", "LM_RUN_CONFIG", "LM_UNSUITED", "LM_TEST", "LM_SCORE_EVERY",
           "ON_REQUEST", "suite_runs", "left_out_why", "run_suite"]

# The runs a suite compares, in table order: FlexP-SFL's λ sweep first (λ = 0.1 is the reference
# of the paired differences), then its baselines. Names are keys of accuracy.RUNS; a name whose
# strategy the server does not register (yet) is left out with a note. SplitFed and FedAvg are each two baselines
# from one run: the global model and global + local fine-tune (suite_report.NO_FINE_TUNE).
SUITE_RUNS = ("flexpsfl", "flexpsfl-l0", "flexpsfl-l0.01", "flexpsfl-l1", "flexpsfl-logit", "flexpsfl-logit-l1",
              "flexpsfl-u", "flexpsfl-u-l0", "flexpsfl-u-l1", "flexpsfl-u-top", "flexpsfl-u-top-l1",
              "splitfed", "fedavg", "fedper", "fedrep", "ditto", "local")

# Runs of accuracy.RUNS that a suite does only when --strategies names them (diagnostics, not baselines)
ON_REQUEST = ("flexpsfl-k4",)

_FOUR = ("rpi4", "rpi4", "rpi5", "jetson-orin")  # the demo's devices: the planner picks different splits
# The lm suite's held-out texts per client, as every suite's (>= 200): the server scores ~24 x this many SmolLM2 texts
# at the end of a run (pretrained, global, personal on each client's own texts; each personal model on the other three
# clients' texts): ~15-17 CPU-min a run at 200 (measured, user + sys, 3 seeds of FlexP-SFL or FedAvg)
LM_TEST = 200
# The devices score their 200 texts every 4th round (and the last): a round's scoring (~65 s here) costs ~3x its
# training (6 steps of 4 texts, ~23 s), so a per-round curve would triple a long run's time
LM_SCORE_EVERY = 4
# The planner's splits for these devices and SmolLM2 are 1, 1, 4, 29; the Jetson's split-29 export had not finished
# after 35 min on the loaded machine, so the Jetson runs split 4 here (the device clock still times each profile)
LM_SPLITS = (1, 1, 4, 4)
# The lm suite's runs: those whose numbers mean the same for a causal LM; the others, and why not.
LM_RUNS = ("flexpsfl", "flexpsfl-u", "splitfed", "fedavg", "local")
# With the splits pinned, a U-shaped device's top defaults to 0 blocks: the final norm and the LM head, frozen (LoRA on
# q/v only; the head is tied to the embedding), so its top would train nothing. One top block gives it a personal,
# trainable top (its LoRA) beside the frozen head, as the planner's U choice does for MiniLM.
LM_RUN_CONFIG = {"flexpsfl-u": {"tops": (1,)}}
LM_UNSUITED = {
    "fedper": "a causal LM has no task head past the last block (LoRA on q/v only; the LM head is frozen and tied to the "
              "embedding), so FedPer's personal part is empty: it would be FedAvg",
    "fedrep": "as FedPer: its head phase would train nothing",
    "ditto": "its personal model v_k never leaves the device, and an LM's perplexity is scored by the server on what "
             "the clients upload (Ditto's w_k): the table would show FedAvg's model under Ditto's name",
}


@dataclasses.dataclass(frozen=True)
class Suite:
    """One suite: what it tests (``what``), its fixed settings (``config``; seed and out are set per run)."""

    name: str
    what: str
    config: SimConfig
    seeds: int = 3
    runs: tuple[str, ...] = SUITE_RUNS  # run by default, in table order (the first is the reference)
    unsuited: dict[str, str] = dataclasses.field(default_factory=dict)  # run -> why this suite never runs it
    run_config: dict[str, dict] = dataclasses.field(default_factory=dict)  # run -> SimConfig fields it sets here

    @property
    def lower_is_better(self) -> bool:
        """A causal LM's suite is scored by perplexity: a lower mean is a better run."""
        return self.config.task == "causal_lm"


def _supersense(alpha: float) -> Suite:
    return Suite(
        name=f"supersense-a{alpha:g}",
        what=f"WordNet noun gloss -> 10 supersenses, 4 clients, Dirichlet label skew α = {alpha:g}",
        config=SimConfig(
            model="minilm", data="supersense", partition="dirichlet", alpha=alpha, clients=4, profiles=_FOUR,
            rounds=10, local_steps=10, batch_size=8, lr=2e-3, optimizer="adamw", max_seq=48,
            max_train=400, max_test=200, min_examples=1000,  # 1000 x test share 0.2 = a full 200-example test split
            eval_every=0, global_every_round=False, bundle_seed=0, in_process=True),
    )


SUITES: dict[str, Suite] = {s.name: s for s in (
    _supersense(0.1),
    _supersense(0.5),
    Suite(
        name="domains",
        what="VADER's 4 natural domains, one per client (binary sentiment under domain shift)",
        config=SimConfig(
            model="minilm", data="vader", partition="natural", clients=4, profiles=_FOUR,
            rounds=10, local_steps=10, batch_size=8, lr=2e-3, optimizer="adamw", max_seq=48,
            max_train=400, max_test=200, eval_every=0, global_every_round=False, bundle_seed=0, in_process=True),
    ),
    Suite(
        name="lm",
        what="SmolLM2 fine-tuned on each device's own VADER domain (perplexity, lower is better)",
        config=SimConfig(
            model="smollm2", task="causal_lm", data="vader", partition="natural", clients=4, profiles=_FOUR, splits=LM_SPLITS,
            rounds=2, local_steps=6, batch_size=4, lr=1e-3, optimizer="adamw", max_seq=32,
            max_train=100, max_test=LM_TEST, eval_every=0, score_every=LM_SCORE_EVERY, bundle_seed=0, in_process=True),
        runs=LM_RUNS, unsuited=LM_UNSUITED, run_config=LM_RUN_CONFIG,
    ),
)}


def suite_runs(requested: str | None, suite: Suite | None = None) -> tuple[list[str], list[str]]:
    """(runs to do, runs left out) for ``--strategies`` on ``suite`` (None: every run of
    :data:`SUITE_RUNS`, then any other of ``accuracy.RUNS`` but :data:`ON_REQUEST`; a suite with its
    own ``runs``: those).
    Left out: a run whose strategy the server does not have (yet), or one the suite names unsuited
    (:meth:`left_out_why` says why)."""
    from flexsfl.benchmarks.accuracy import RUNS
    from flexsfl.core.errors import ConfigError
    from flexsfl.server_backend.strategy import STRATEGIES

    unsuited = suite.unsuited if suite is not None else {}
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in RUNS]
        if unknown or not names:
            raise ConfigError(f"--strategies {requested!r}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                              f"{', '.join(RUNS)}")
    elif suite is not None and suite.runs != SUITE_RUNS:
        names = [n for n in suite.runs if n in RUNS] + sorted(unsuited)
    else:
        names = [n for n in SUITE_RUNS if n in RUNS] + [n for n in RUNS if n not in SUITE_RUNS and n not in ON_REQUEST]
    ok = lambda n: RUNS[n]["strategy"] in STRATEGIES and n not in unsuited  # noqa: E731
    return [n for n in names if ok(n)], [n for n in names if not ok(n)]


def left_out_why(suite: Suite, names: list[str]) -> dict[str, str]:
    """Each left-out run of ``suite`` -> why it is not run (unsuited, or no such strategy on the server yet)."""
    return {n: suite.unsuited.get(n, "no such strategy on the server yet") for n in names}


def run_suite(args, **overrides) -> tuple[list[dict], str]:
    """Every run of ``--strategies`` (default: all the server has) on suite ``args.suite``, once per
    seed 0..``--seeds``-1, run by run in the order given (so a cut-short suite still holds every seed of
    its first runs: the paired differences need them). A run whose
    ``summary.json`` holds the same config is reused, not run again; with ``--report-only`` nothing
    runs and the report holds the finished runs alone. Writes ``suite.json`` (rows,
    intervals, paired differences), ``suite.md`` and ``<suite>.png`` under ``--out``; returns (rows, markdown).

    ``overrides``: further :class:`SimConfig` fields for every run (tests: a tiny model in-process)."""
    import json
    import pathlib
    import time

    from flexsfl.benchmarks.accuracy import RUNS, row
    from flexsfl.benchmarks.suite_report import markdown, plot_suite, summarize
    from flexsfl.core.atomic import atomic_write_text
    from flexsfl.core.errors import ConfigError
    from flexsfl.sim.simulate import simulate

    suite = SUITES[args.suite]
    seeds = args.seeds if args.seeds is not None else suite.seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    names, missing = suite_runs(args.strategies, suite)
    if not names:
        raise ConfigError(f"--strategies {args.strategies!r}: none of them is a strategy the server has yet "
                          f"({', '.join(missing)}); choose from {', '.join(RUNS)}")
    out = pathlib.Path(args.out or f"results/suites/{suite.name}")
    given = {"model": args.model, "rounds": args.rounds, "local_steps": args.local_steps}
    base = dataclasses.replace(suite.config, target_acc=args.target_acc,
                               **{k: v for k, v in given.items() if v is not None}, **overrides)
    rows: list[dict] = []
    unfinished: list[str] = []  # --report-only: runs not (yet) finished under --out
    for name in names:
        for seed in range(seeds):
            cfg = dataclasses.replace(base, seed=seed, out=str(out / name / f"seed{seed}"),
                                      **{**RUNS[name], **suite.run_config.get(name, {})})
            done = pathlib.Path(cfg.out) / "summary.json"
            if done.is_file() and _same_config(json.loads(done.read_text())["config"], cfg):
                summary, how = json.loads(done.read_text()), "reused"
            elif getattr(args, "report_only", False):
                unfinished.append(f"{name} seed {seed}")
                continue
            else:
                t0 = time.perf_counter()
                summary = simulate(cfg, show=False)
                how = f"{time.perf_counter() - t0:.0f} s"
            rows.append({**row(name, summary), "out": cfg.out})
            key = "personal_ppl" if suite.lower_is_better else "personal_acc"
            got = rows[-1].get(key)
            print(f"{suite.name} seed {seed} {name}: {key} {'—' if got is None else f'{got:.3f}'} ({how})", flush=True)
            report = summarize(rows, reference=names[0])
            atomic_write_text(out / "suite.json", json.dumps({"suite": suite.name, "what": suite.what, "seeds": seeds,
                                                              "left_out": missing, "rows": rows, **report},
                                                             indent=2, sort_keys=True) + "\n")
    if not rows:
        raise ConfigError(f"{out}: no finished run of {', '.join(names)} to report; run without --report-only first")
    if unfinished:
        print(f"not finished, left out of the report: {', '.join(unfinished)}", flush=True)
    report = summarize(rows, reference=names[0])
    md = markdown(suite, rows, report, left_out_why(suite, missing))
    atomic_write_text(out / "suite.md", md)
    plot_suite(suite, rows, out / f"{suite.name}.png")
    return rows, md


def _same_config(stored: dict, cfg: SimConfig) -> bool:
    """Whether a finished run's ``summary.json`` config is ``cfg`` (its class count inferred if ``cfg`` left it out)."""
    import json

    want = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as stored
    if want.get("num_labels") is None:
        stored = {**stored, "num_labels": None}
    # a field added to SimConfig after the run was stored cannot have been set by it: compare the shared ones;
    # ``out`` is where the summary was found (stored absolute), so it is the same directory by construction
    return all(stored[k] == want[k] for k in (stored.keys() & want.keys()) - {"out"})
