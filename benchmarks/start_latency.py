"""Start latency and throughput of isolated tasks: housekeeping vs the standard library.

Usage: ``python -m benchmarks.start_latency [--quick]`` (from the repository root).

Every approach runs each trivial task in a process of its own, in one run on
one machine, so that the ratios mean something even on a noisy host:

* housekeeping ``Manager``: start latency is ``run_task`` until the change
  event that the task is ACTIVE (handed to its pre-started process) reaches a
  ``subscribe`` callback, one task at a time on an idle manager; throughput is
  1,000 tasks with ``max_workers=2``, from the first ``run_task`` to the last
  terminal event.
* bare ``multiprocessing.Process``, ``fork`` and ``forkserver`` (preloaded):
  start latency is ``start()`` until the first pipe message from the child;
  throughput runs the same tasks two at a time (start, read the message, join).
* ``ProcessPoolExecutor(max_workers=2, max_tasks_per_child=1)`` (forkserver:
  3.11 refuses fork with ``max_tasks_per_child``): throughput only.

``--quick`` takes fewer samples (well under a minute).
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.measure import bench_manager, bench_pool, bench_process, print_report


def main(argv: list[str] | None = None) -> int:
    """Run every approach and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.start_latency",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer samples (< 1 min)")
    parser.add_argument("--samples", type=int, help="start-latency samples (default 200)")
    parser.add_argument("--tasks", type=int, help="throughput tasks (default 1000)")
    options = parser.parse_args(argv)
    samples = options.samples or (50 if options.quick else 200)
    tasks = options.tasks or (200 if options.quick else 1000)

    # NOTE: the fork benchmark runs first, while this process has no threads;
    # the Manager (loop and event threads) comes last.
    rows = [bench_process("fork", samples, tasks),
            bench_process("forkserver", samples, tasks),
            bench_pool(samples, tasks)]
    rows.insert(0, bench_manager(samples, tasks))
    print_report(rows, samples, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
