"""A LocalCluster in a process of its own, for the tests: prints its address, runs
until its standard input closes (the test session ended, or died), then closes."""

from __future__ import annotations

import sys

import distributed

if __name__ == "__main__":
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None,
    )
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()
    cluster.close(timeout=20)
