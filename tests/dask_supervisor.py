"""A supervisor process for the Dask tests: starts tasks on a cluster, prints
their process trees as one JSON line, then waits to be killed.

Usage: python dask_supervisor.py SCHEDULER_ADDRESS LEASE_TIMEOUT
"""

from __future__ import annotations

import json
import sys
import time

import animators

from supervisor import Manager
from supervisor.backends.dask import DaskBackend

if __name__ == "__main__":
    backend = DaskBackend(sys.argv[1], lease_timeout=float(sys.argv[2]))
    manager = Manager(backend=backend, max_workers=2, cancel_grace=60)
    manager.register_animator("FORKER", animators.Forker())
    manager.register_animator("STUBBORN", animators.Stubborn())
    ids = [manager.run_task({"operation": "FORKER"}), manager.run_task({"operation": "STUBBORN"})]
    pids: list[int] = []
    for task_id in ids:
        deadline = time.monotonic() + 60
        while (info := animators.ready_info(manager.get_task(task_id))) is None:
            if time.monotonic() > deadline:
                sys.exit(f"task {task_id} never became ready: {manager.get_task(task_id)}")
            time.sleep(0.01)
        pids += [info["pid"], *info.get("children", [])]
    print(json.dumps(pids), flush=True)
    time.sleep(3600)
