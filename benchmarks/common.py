"""What every benchmark shares: options, statistics, ratios, the report, and guards.

A benchmark module exposes ``TITLE`` and ``run(options) -> Section``. It
measures housekeeping and its peers alternately, round after round, so that a
noisy machine slows both alike, and returns its figures as :class:`Series`
grouped in :class:`Table` objects. This module prints them (median, p95 and
the ratio of each housekeeping row to each peer) and turns them into JSON.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

#: Deadlock guard of every single wait; never reached on a working setup.
TIMEOUT = 60.0
#: Prefix that marks a row as housekeeping's own (the others are peers).
OURS = "housekeeping"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})


@dataclass(frozen=True)
class Options:
    """The command line, as the benchmarks see it."""

    quick: bool = False

    def pick(self, quick: Any, full: Any) -> Any:
        """Return ``quick`` under ``--quick``, else ``full``."""
        return quick if self.quick else full


class BenchmarkTimeout(Exception):
    """Raised in the main thread when a benchmark overruns its time limit."""


# -- statistics ----------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Return the ``q``-th percentile (0..100) by nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Series:
    """One row: an approach's samples of one metric.

    ``p95`` is always the bad tail: the 95th percentile of a lower-is-better
    metric, the 5th percentile of a higher-is-better one (95 % of the samples
    are at least that good).
    """

    name: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ours(self) -> bool:
        """True for housekeeping's own rows."""
        return self.name.startswith(OURS)

    @property
    def median(self) -> float | None:
        """The median, or None without samples."""
        return statistics.median(self.samples) if self.samples else None

    def tail(self, higher_is_better: bool) -> float | None:
        """The bad-side 95 % figure (see the class docstring)."""
        if not self.samples:
            return None
        return percentile(self.samples, 5 if higher_is_better else 95)


@dataclass
class Table:
    """Rows of one metric, in one unit, compared with each other.

    ``pairs`` lists the (ours, peer) row names whose ratios are printed; by
    default every housekeeping row is compared with every peer row.
    """

    title: str
    unit: str
    rows: list[Series]
    higher_is_better: bool = False
    scale: float = 1.0  #: samples are multiplied by this when printed (s → ms: 1000)
    digits: int = 2
    pairs: list[tuple[str, str]] | None = None
    #: Heading of the ratios (a table whose pairs are not housekeeping ÷ a peer says so).
    ratio_title: str = "ratio housekeeping ÷ peer"

    def row(self, name: str) -> Series:
        """The row called ``name`` (created empty if absent)."""
        for series in self.rows:
            if series.name == name:
                return series
        series = Series(name)
        self.rows.append(series)
        return series

    def ratio_pairs(self) -> list[tuple[Series, Series]]:
        """The (ours, peer) pairs to print ratios for."""
        by_name = {r.name: r for r in self.rows}
        if self.pairs is not None:
            return [(by_name[a], by_name[b]) for a, b in self.pairs
                    if a in by_name and b in by_name]
        ours = [r for r in self.rows if r.ours]
        peers = [r for r in self.rows if not r.ours]
        return [(a, b) for a in ours for b in peers]


@dataclass
class Section:
    """What one benchmark found: tables, notes and loose facts."""

    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  #: 1-minute load average before, after
    error: str | None = None


def ratio(mine: float | None, theirs: float | None) -> float | None:
    """``mine / theirs``, or None when either is missing or zero."""
    if mine is None or not theirs:
        return None
    return mine / theirs


# -- the report ----------------------------------------------------------------


def _fmt(value: float | None, table: Table) -> str:
    if value is None:
        return "—"
    value *= table.scale
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.{table.digits}f}"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _pair_label(mine: str, theirs: str) -> str:
    """``X: ÷ peer`` when both rows measure the same X, else ``mine ÷ theirs``."""
    what = mine.removeprefix(OURS).strip()
    if theirs.endswith(" " + what):
        return f"{what}: ÷ {theirs.removesuffix(' ' + what)}"
    return f"{what} ÷ {theirs}"


def print_section(section: Section, out: Callable[[str], None] = print) -> None:
    """Print one benchmark's tables, ratios, facts and notes."""
    out(f"\n=== {section.title}  ({section.seconds:.0f} s; 1-min load average "
        f"{section.load[0]:.1f} before, {section.load[1]:.1f} after)")
    if section.error:
        out(f"  FAILED: {section.error}")
    for table in section.tables:
        direction = "higher is better" if table.higher_is_better else "lower is better"
        width = max([len(r.name) for r in table.rows] + [20])
        out(f"\n  {table.title} [{table.unit}, {direction}]")
        out(f"    {'':<{width}}  {'n':>5}  {'median':>10}  {'p95':>10}")
        for row in table.rows:
            note = f"  ({row.note})" if row.note else ""
            out(f"    {row.name:<{width}}  {len(row.samples):>5}  "
                f"{_fmt(row.median, table):>10}  "
                f"{_fmt(row.tail(table.higher_is_better), table):>10}{note}")
        pairs = table.ratio_pairs()
        if pairs:
            single = len({a.name for a, _ in pairs}) == 1
            labels = [b.name if single else _pair_label(a.name, b.name) for a, b in pairs]
            lw = max([width, *map(len, labels)])
            out(f"    {table.ratio_title:<{lw}}  {'':>5}  {'median':>10}  {'p95':>10}")
            hib = table.higher_is_better
            for label, (mine, theirs) in zip(labels, pairs, strict=True):
                out(f"      {label:<{lw - 2}}  {'':>5}  "
                    f"{_fmt_ratio(ratio(mine.median, theirs.median)):>10}  "
                    f"{_fmt_ratio(ratio(mine.tail(hib), theirs.tail(hib))):>10}")
    if section.facts:
        out("")
        for key, value in section.facts.items():
            out(f"  {key}: {value}")
    for note in section.notes:
        out(f"  · {note}")


def section_json(section: Section) -> dict[str, Any]:
    """The JSON form of a section (samples included, in the printed unit)."""
    tables = []
    for table in section.tables:
        rows = []
        for row in table.rows:
            hib = table.higher_is_better
            rows.append({
                "name": row.name,
                "n": len(row.samples),
                "median": None if row.median is None else row.median * table.scale,
                "p95": None if row.tail(hib) is None else row.tail(hib) * table.scale,  # type: ignore[operator]
                "note": row.note,
                "samples": [s * table.scale for s in row.samples],
            })
        ratios = [{"ours": a.name, "peer": b.name,
                   "median": ratio(a.median, b.median),
                   "p95": ratio(a.tail(table.higher_is_better), b.tail(table.higher_is_better))}
                  for a, b in table.ratio_pairs()]
        tables.append({"title": table.title, "unit": table.unit,
                       "higher_is_better": table.higher_is_better,
                       "rows": rows, "ratios": ratios})
    return {"title": section.title, "seconds": section.seconds, "load_average": section.load,
            "error": section.error,
            "tables": tables, "facts": section.facts, "notes": section.notes}


def machine() -> dict[str, Any]:
    """Cores, CPU, Python and the versions of what is compared."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    versions = {}
    for name in ("housekeeping-supervisor", "falcon", "waitress", "uvloop", "psutil", "pebble",
                 "loky"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "versions": versions,
    }


# -- alternation ----------------------------------------------------------------


class Approach:
    """One way of doing what a benchmark measures: set up, sample, tear down.

    ``with approach:`` sets it up (and warms it up); :meth:`sample` takes one
    measurement; leaving the block tears everything down, also on error.
    """

    name = "approach"
    #: Sleep before each sample, so that every sample starts from idle.
    pause = 0.0

    def __enter__(self) -> Approach:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def sample(self) -> float | dict[str, float]:
        """Take one measurement (or several, by row name)."""
        raise NotImplementedError


def alternate(approaches: list[Approach], rounds: int,
              per_round: int | Callable[[Approach, int], int], table: Table) -> None:
    """Run the approaches in turn, ``rounds`` times, ``per_round`` samples each time.

    ``per_round`` may be a function of the approach and the round's index (an
    approach given 0 samples in a round is not set up in it). The order
    rotates from round to round, so no approach always runs first (or right
    after a heavy one).
    """
    for index in range(rounds):
        shift = index % len(approaches)
        for approach in approaches[shift:] + approaches[:shift]:
            count = per_round(approach, index) if callable(per_round) else per_round
            table.row(approach.name)
            if not count:
                continue
            with approach:
                for _ in range(count):
                    if approach.pause:
                        time.sleep(approach.pause)
                    value = approach.sample()
                    values = value if isinstance(value, dict) else {approach.name: value}
                    for name, figure in values.items():
                        table.row(name).samples.append(figure)


# -- guards ----------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`BenchmarkTimeout` in the main thread after ``seconds``.

    The exception unwinds through the benchmark's ``finally`` blocks, so its
    managers, pools and servers are still shut down.
    """
    def on_alarm(signum: int, frame: object) -> None:
        raise BenchmarkTimeout(f"{what} took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: Helpers that multiprocessing and loky keep until the interpreter exits.
_HELPERS = ("resource_tracker", "forkserver")


def leftover_processes(grace: float = 3.0) -> list[str]:
    """Kill and name any process still below this one after ``grace`` seconds.

    multiprocessing's forkserver and the resource trackers of multiprocessing
    and loky are not counted: they belong to the interpreter and end with it.
    """
    me = psutil.Process()
    deadline = time.monotonic() + grace

    def remaining() -> list[psutil.Process]:
        found = []
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if _alive(child) and not any(h in " ".join(child.cmdline()) for h in _HELPERS):
                    found.append(child)
        return found

    children = remaining()
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        children = remaining()
    names = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            names.append(f"{child.pid} {' '.join(child.cmdline())[:80]}")
            child.kill()
    psutil.wait_procs(children, timeout=2)
    return names


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT,
               step: float = 0.001) -> None:
    """Poll ``predicate`` until it holds; raise on the deadlock guard."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)
