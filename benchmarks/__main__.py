"""``python -m benchmarks [--quick] [--json FILE] [--only NAME,...]``.

Runs every benchmark (or those named), each measuring housekeeping and its
peers alternately in this one run, and prints median, p95 and the ratio of
housekeeping to each peer, after the machine it ran on. There is no pass or
fail: ratios are the result. ``--quick`` takes fewer samples (under two
minutes on two cores); the full run takes under fifteen.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any

#: Benchmark name → module, in the order they run (the issue's order).
BENCHMARKS = {
    "start": "benchmarks.start",
    "throughput": "benchmarks.throughput",
    "cancel": "benchmarks.cancel",
    "flood": "benchmarks.flood",
    "rest": "benchmarks.rest_api",
    "memory": "benchmarks.memory",
    "scaling": "benchmarks.scaling",
    "dask": "benchmarks.dask_backend",
    "hostile": "benchmarks.hostile",
    "sandbox": "benchmarks.sandbox",
    "output": "benchmarks.task_output",
    "journal": "benchmarks.journal",
}
#: Hard time limit of one benchmark (seconds): quick, full.
LIMITS = {"quick": 60.0, "full": 300.0}

RET_OK = 0  # every benchmark ran
RET_FAILED = 1  # at least one benchmark failed (the others still ran and printed)
RET_USAGE = 2  # the command line is wrong (argparse uses the same code)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="housekeeping side by side with the standard library, pebble, loky "
                    "and bare Falcon on waitress.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples: under 2 minutes on 2 cores")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--only", metavar="NAME,...",
                        help=f"run only these, of: {', '.join(BENCHMARKS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print and optionally save the results."""
    args = build_parser().parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; "
                  f"choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return RET_USAGE

    from benchmarks.common import (
        Options,
        Section,
        leftover_processes,
        machine,
        print_section,
        section_json,
        time_limit,
    )

    options = Options(quick=args.quick)
    info = machine()
    began = time.monotonic()
    print(f"machine: {info['cores']} cores ({info['usable_cores']} usable), {info['cpu']}, "
          f"{info['memory_gib']} GiB; {info['python']} on {info['platform']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"mode: {'quick' if args.quick else 'full'}; every figure is from this run; "
          "compare rows with each other, not with other machines")
    load = os.getloadavg()[0]
    print(f"1-min load average at start: {load:.2f}"
          + (f" -- busy for {info['cores']} cores: trust the ratios and CPU times more "
             "than latencies" if load > (info["cores"] or 1) else ""), flush=True)

    limit = LIMITS["quick" if args.quick else "full"]
    sections: list[Section] = []
    failed = False
    for name in names:
        module: Any = importlib.import_module(BENCHMARKS[name])
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        try:
            with time_limit(limit, name):
                section = module.run(options)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            section = Section(module.TITLE, error=f"{type(exc).__name__}: {exc}")
        section.seconds = time.monotonic() - started
        section.load = (load_before, os.getloadavg()[0])
        sections.append(section)
        print_section(section)
        sys.stdout.flush()

    leftovers = leftover_processes()
    wall = time.monotonic() - began
    print(f"\nleft-over processes: {', '.join(leftovers) if leftovers else 'none'}")
    print(f"total wall time: {wall:.0f} s")
    if args.json:
        document = {"machine": info, "mode": "quick" if args.quick else "full",
                    "wall_seconds": wall, "leftover_processes": leftovers,
                    "benchmarks": {name: section_json(section)
                                   for name, section in zip(names, sections, strict=True)}}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=1, ensure_ascii=False)
            out.write("\n")
        print(f"figures written to {args.json}")
    return RET_FAILED if failed or leftovers else RET_OK


if __name__ == "__main__":
    sys.exit(main())
