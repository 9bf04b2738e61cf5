"""A cluster on loopback in a process of its own, for the tests (the one
``DaskBackend.local`` starts, with no dashboard): prints its address, runs until
its standard input closes (the test session ended, or died), then closes."""

from __future__ import annotations

import sys

from supervisor.backends.dask import local_cluster

if __name__ == "__main__":
    cluster = local_cluster(n_workers=2)
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()
    cluster.close(timeout=20)
