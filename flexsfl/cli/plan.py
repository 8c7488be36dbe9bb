"""``flexsfl plan``: predict memory and step time of every split (``--topology u``: every (split, top)) for one device; print the choice.

With ``--calibrate-from`` it also shows the accuracy each layout reached in earlier runs and, with
``--accuracy-weight W > 0``, chooses by utility instead of speed alone (:mod:`flexsfl.core.calibration`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from rich.console import Console
from rich.table import Table

from flexsfl.core.atomic import atomic_write_text
from flexsfl.core.calibration import METRICS, TradeOff, read_calibration, trade_off
from flexsfl.core.constants import TASKS
from flexsfl.core.errors import ConfigError
from flexsfl.core.cost import ModelCost
from flexsfl.core.memory import OPTIMIZER_STATES, RUNTIMES, largest_split
from flexsfl.core.model_config import read_model_config
from flexsfl.core.planner import DEFAULT_CLIENTS, DEFAULT_SERVER_GFLOPS, choose_split
from flexsfl.core.profile import DeviceProfile, read_profile
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.core.u_planner import choose_u_split
from flexsfl.core.wire.tensors import ENCODINGS

__all__ = ["add_parser", "run"]


def _profile(arg: str) -> DeviceProfile:
    if arg in EXAMPLE_PROFILES and not pathlib.Path(arg).exists():
        return EXAMPLE_PROFILES[arg]
    return read_profile(arg)


def run(args: argparse.Namespace) -> int:
    """``flexsfl plan``: predict memory and step time of every split for one device; print the choice."""
    profile = _profile(args.profile)
    if args.memory_budget_mb is not None:
        profile = dataclasses.replace(profile, memory_budget_mb=args.memory_budget_mb)
    cost = ModelCost.from_config(
        read_model_config(args.model), task=args.task, num_labels=args.num_labels, lora_r=args.lora_r,
        lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
    )
    if args.topology == "u" or args.top is not None:
        return _run_u(args, cost, profile)
    choice = choose_split(
        cost, profile, batch=args.batch, seq=args.seq, pin=args.pin, optimizer=args.optimizer, runtime=args.runtime,
        server_gflops=args.server_gflops, clients=args.clients, encoding=args.encoding, align=args.align,
    )
    runtime = args.runtime or profile.backend or "ort"
    fits = _largest_heads(cost, args, runtime)
    to = _trade_off(args, choice.estimates, (choice.split, None), {(args.pin, None)} if choice.pinned else None)
    if args.json:
        print(json.dumps({"model": args.model, "profile": profile.to_json(), "batch": args.batch, "seq": args.seq,
                          **choice.to_json(), "largest_split_by_gb": fits, **_trade_json(to)}, indent=2, sort_keys=True))
        return 0
    table = Table(title=f"{args.model} ({cost.family}, {cost.num_blocks} blocks) on {profile.name}: batch {args.batch}, "
                        f"seq {args.seq}, {runtime}, budget {profile.memory_budget_mb} MB")
    for col in ("split", "memory MB", "fits", "device s", "network s", "server s", "step s", ""):
        table.add_column(col, justify="right" if col not in ("fits", "") else "left")
    for e in choice.estimates:
        mark = "pinned" if e.split == choice.split and choice.pinned else ("chosen" if e.split == choice.split else "")
        table.add_row(
            str(e.split), f"{e.memory_mb:.0f}", "yes" if e.fits else "no", f"{e.head_s:.3f}",
            "-" if e.network_s is None else f"{e.network_s:.3f}", f"{e.server_s:.3f}", f"{e.time_s:.3f}", mark,
            style="bold" if mark else None,
        )
    console = Console()
    console.print(table)
    console.print(f"split {choice.split}: {choice.reason}", highlight=False)
    for note in choice.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"largest head that trains in 1 / 2 / 4 GB ({runtime}, batch {args.batch}, seq {args.seq}): "
                  + " / ".join("none" if s is None else f"split {s}" for s in fits.values()), highlight=False)
    _print_trade_off(console, to, u=False)
    return 0


def _largest_heads(cost: ModelCost, args: argparse.Namespace, runtime: str) -> dict[str, int | None]:
    """``{"1": split, "2": ..., "4": ...}``: the largest head within 1, 2 and 4 GB (1 GB = 1000 MB) of device memory."""
    return {str(gb): largest_split(cost, 1000.0 * gb, batch=args.batch, seq=args.seq, optimizer=args.optimizer,
                                   runtime=runtime, align=args.align) for gb in (1, 2, 4)}


def _run_u(args: argparse.Namespace, cost: ModelCost, profile: DeviceProfile) -> int:
    """The U-shaped topology: one row per split with its best top; the chosen (split, top) and why."""
    choice = choose_u_split(
        cost, profile, batch=args.batch, seq=args.seq, pin_split=args.pin, pin_top=args.top, optimizer=args.optimizer,
        runtime=args.runtime, server_gflops=args.server_gflops, clients=args.clients, encoding=args.encoding,
        align=args.align,
    )
    allowed = {(e.split, e.top) for e in choice.estimates
               if (args.pin is None or e.split == args.pin) and (args.top is None or e.top == args.top)}
    to = _trade_off(args, choice.estimates, (choice.split, choice.top), allowed)
    if args.json:
        print(json.dumps({"model": args.model, "profile": profile.to_json(), "batch": args.batch, "seq": args.seq,
                          **choice.to_json(), **_trade_json(to)}, indent=2, sort_keys=True))
        return 0
    runtime = args.runtime or profile.backend or "ort"
    table = Table(title=f"{args.model} ({cost.family}, {cost.num_blocks} blocks), U-shaped, on {profile.name}: batch "
                        f"{args.batch}, seq {args.seq}, {runtime}, budget {profile.memory_budget_mb} MB "
                        "(per split: its fastest top that fits, else its smallest)")
    for col in ("split", "top", "memory MB", "fits", "device s", "network s", "server s", "step s", ""):
        table.add_column(col, justify="right" if col not in ("fits", "") else "left")
    rows: dict[int, tuple] = {}
    for e in choice.estimates:  # per split: the chosen pair, else its fastest fitting top, else its smallest
        key = ((e.split, e.top) == (choice.split, choice.top), e.fits, -e.time_s if e.fits else -e.memory_mb)
        if e.split not in rows or key > rows[e.split][0]:
            rows[e.split] = (key, e)
    for _, e in sorted(rows.values(), key=lambda r: r[1].split):
        chosen = (e.split, e.top) == (choice.split, choice.top)
        mark = ("pinned" if choice.pinned else "chosen") if chosen else ""
        table.add_row(str(e.split), str(e.top), f"{e.memory_mb:.0f}", "yes" if e.fits else "no", f"{e.device_s:.3f}",
                      "-" if e.network_s is None else f"{e.network_s:.3f}", f"{e.server_s:.3f}", f"{e.time_s:.3f}", mark,
                      style="bold" if mark else None)
    console = Console()
    console.print(table)
    console.print(f"split {choice.split}, top {choice.top}: {choice.reason}", highlight=False)
    for note in choice.notes:
        console.print(f"note: {note}", highlight=False)
    _print_trade_off(console, to, u=True)
    return 0


def _trade_off(args: argparse.Namespace, estimates, chosen, allowed) -> TradeOff | None:
    """The accuracy-aware choice when ``--calibrate-from`` is given (else None; a weight without it is refused)."""
    if args.calibrate_from is None:
        if args.accuracy_weight or args.save_calibration:
            raise ConfigError("--accuracy-weight and --save-calibration need --calibrate-from RUNS_DIR_OR_FILE")
        return None
    cal = read_calibration(args.calibrate_from, args.calibration_metric)
    for what, have, want in (("model", cal.model, args.model), ("task", cal.task, args.task)):
        if have is not None and have != want:
            raise ConfigError(f"{args.calibrate_from}: calibrated on {what} {have!r}, planning for {want!r}; calibrate "
                              f"with runs of {what} {want!r}")
    if args.save_calibration:
        atomic_write_text(args.save_calibration, json.dumps(cal.to_json(), indent=2, sort_keys=True) + "\n")
    return trade_off(estimates, chosen, cal, args.accuracy_weight, allowed=allowed)


def _trade_json(to: TradeOff | None) -> dict:
    return {} if to is None else {"trade_off": to.to_json()}


def _print_trade_off(console: Console, to: TradeOff | None, *, u: bool) -> None:
    """The trade-off table (U: only the calibrated layouts and the two choices) and the final choice."""
    if to is None:
        return
    table = Table(title=f"accuracy vs device time: utility = {to.weight:g} x accuracy - step s / fastest step s")
    for col in ("split", *(("top",) if u else ()), "step s", "memory MB", "fits", "accuracy", "utility", ""):
        table.add_column(col, justify="left" if col in ("fits", "") else "right")
    for r in to.rows:
        mark = "chosen" if (r.split, r.top) == (to.split, to.top) else ("planner" if (r.split, r.top) == to.planner else "")
        if u and r.accuracy is None and not mark:
            continue
        table.add_row(str(r.split), *((str(r.top),) if u else ()), f"{r.time_s:.3f}", f"{r.memory_mb:.0f}",
                      "yes" if r.fits else "no", "-" if r.accuracy is None else f"{r.accuracy:.3f}",
                      "-" if r.utility is None else f"{r.utility:.3f}", mark, style="bold" if mark == "chosen" else None)
    console.print(table)
    where = f"split {to.split}" + (f", top {to.top}" if u else "")
    console.print(f"{where} by accuracy and time: {to.reason}", highlight=False)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``flexsfl plan``."""
    p = sub.add_parser("plan", help="choose a device's split point from its profile: memory and step time per split")
    p.add_argument("--model", required=True, help="minilm, smollm2, or a local Hugging Face model directory")
    p.add_argument("--profile", required=True,
                   help=f"device profile JSON from `flexsfl edge probe --json`, or an example: {', '.join(EXAMPLE_PROFILES)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--pin", "--split", dest="pin", type=int,
                   help="use this split (refused if it does not fit the memory budget)")
    p.add_argument("--topology", choices=("head-tail", "u"), default="head-tail",
                   help="head-tail: the server holds the output and sees labels; u: the device also trains the last "
                        "blocks + task head (labels stay on it; two more transfers per step)")
    p.add_argument("--top", type=int, help="U-shaped: use this many top blocks (implies --topology u)")
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=int, help="override the profile's budget")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="sgd", help="on-device optimizer")
    p.add_argument("--runtime", choices=list(RUNTIMES), help="device runtime (default: the profile's backend, else ort)")
    p.add_argument("--encoding", choices=list(ENCODINGS), default="fp32", help="transfer encoding of Z and g")
    p.add_argument("--server-gflops", dest="server_gflops", type=float, default=DEFAULT_SERVER_GFLOPS,
                   help="the server's achieved training throughput")
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="clients the server serves at once")
    p.add_argument("--align", action="store_true", help="alignment on (λ > 0): the device runs a second forward for Z'")
    p.add_argument("--task", choices=TASKS, default=TASKS[0])
    p.add_argument("--num-labels", dest="num_labels", type=int, default=2)
    p.add_argument("--lora-r", dest="lora_r", type=int, default=8)
    p.add_argument("--lora-targets", dest="lora_targets", help="comma-separated module names (default: attention q,v)")
    p.add_argument("--calibrate-from", dest="calibrate_from", metavar="PATH",
                   help="accuracy per layout from earlier runs: a directory of `flexsfl simulate` results (every "
                        "summary.json below it) or a calibration file (--save-calibration); adds a trade-off table")
    p.add_argument("--accuracy-weight", dest="accuracy_weight", type=float, default=0.0, metavar="W",
                   help="choose by W x accuracy - step time / fastest step time (one accuracy point is worth W %% of "
                        "the fastest step); 0 (default): the fastest layout that fits")
    p.add_argument("--calibration-metric", dest="calibration_metric", choices=METRICS, default=METRICS[0],
                   help="which accuracy of the calibration runs to trade (default: personal_acc)")
    p.add_argument("--save-calibration", dest="save_calibration", metavar="FILE",
                   help="write the calibration read from --calibrate-from as a JSON file")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON instead of a table")
    p.set_defaults(func=run)
