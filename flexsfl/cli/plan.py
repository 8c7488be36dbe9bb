"""``flexsfl plan``: predict memory and step time of every split (``--topology u``: every (split, top)) for one device; print the choice."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from rich.console import Console
from rich.table import Table

from flexsfl.core.constants import TASKS
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
    if args.json:
        print(json.dumps({"model": args.model, "profile": profile.to_json(), "batch": args.batch, "seq": args.seq,
                          **choice.to_json(), "largest_split_by_gb": fits}, indent=2, sort_keys=True))
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
    if args.json:
        print(json.dumps({"model": args.model, "profile": profile.to_json(), "batch": args.batch, "seq": args.seq,
                          **choice.to_json()}, indent=2, sort_keys=True))
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
    return 0


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
    p.add_argument("--json", action="store_true", help="print the estimates as JSON instead of a table")
    p.set_defaults(func=run)
