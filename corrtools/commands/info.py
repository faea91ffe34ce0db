"""``corrtools info RUN.zarr``: what a run store holds (status, steps, parameters, chunking, size),
and on a store still recording its progress (rows, steps per second, last write)."""
from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "run", "format_info"]

_SHOWN = {"corrtools_format", "status", "total_steps", "notes"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info", help="describe a run store",
        description="Print a run store's status, steps recorded, parameters and sampled counts, "
                    "chunking, size on disk and attributes.",
    )
    p.add_argument("path", help="path of a run store, e.g. runs/demo.zarr")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_info(info: dict[str, Any]) -> str:
    """The human-readable summary printed by ``corrtools info``."""
    lines = [f"run store   {info['path']}"]
    status = info["status"]
    if info.get("writer"):
        status += f" (being written by {info['writer']})"
    elif status == "recording":
        status += " (no writer: interrupted, resumable with resume=True)"
    lines.append(f"status      {status}")
    n = info["steps_written"]
    if n:
        lines.append(f"steps       {n} recorded, steps {info['step_first']}..{info['step_last']}")
    else:
        lines.append("steps       0 recorded")
    if info.get("total_steps") is not None:
        lines.append(f"total       {info['total_steps']} optimizer steps")
    if info["status"] != "complete" and n and info.get("progress"):
        lines.append(f"progress    {_progress(info['progress'], n)}")
    lines.append(f"weights     {info['n_weights']} in {len(info['params'])} parameters")
    width = max((len(k) for k in info["params"]), default=0)
    for name, count in info["params"].items():
        lines.append(f"  {name:<{width}}  {count}")
    if info.get("ranks"):
        lines.append(f"sharded     written by {len(info['ranks'])} ranks, each into its own part")
    for gap in info.get("missing") or []:
        cols = ", ".join(f"{name} ({count})" for name, count in gap["params"].items())
        lines.append(
            f"missing     rank {gap['rank']} committed {gap['steps_written']} of {gap['of']} steps; "
            f"the later steps of its columns are missing: {cols}"
        )
    ch = info["chunks"]
    if ch:
        lines.append(f"chunks      {ch['step']} steps x {ch['weight']} weights, codecs {'+'.join(info['codecs'])}")
    if info["optional"]:
        lines.append(f"also        {', '.join(info['optional'])}")
    if info["groups"]:
        lines.append(f"results     {', '.join(info['groups'])}")
    lines.append(f"size        {_size(info['size_bytes'])} on disk")
    for note in info["attrs"].get("notes") or []:
        lines.append(f"note        {note}")
    lines.append("attrs")
    for key, val in info["attrs"].items():
        if key not in _SHOWN:
            lines.append(f"  {key}: {json.dumps(val) if not isinstance(val, str) else val}")
    return "\n".join(lines)


def _progress(prog: dict[str, Any], rows: int) -> str:
    """"1200 rows, 35.2 steps/s, last write 2026-11-25 03:10:05 UTC (4 s ago)"."""
    parts = [f"{rows} rows"]
    rate = prog.get("steps_per_second")
    parts.append(f"{rate:.3g} steps/s" if rate is not None else "steps/s unknown")
    if prog.get("last_write"):
        when = prog["last_write"].replace("T", " ").replace("+00:00", " UTC")
        parts.append(f"last write {when} ({_ago(prog['seconds_since_write'])} ago)")
    return ", ".join(parts)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def run(args: argparse.Namespace) -> int:
    from corrtools.record.store import run_info

    info = run_info(args.path)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
