"""The fault matrix over REST once more, with the tasks on ``--dask local``.

Every row of :data:`test_faults.FAULTS` runs against a real ``housekeeping
serve --dask local`` subprocess: the task runs on a Dask worker process (a
child of the server), in a process of the worker's own starter, and must end
as the row documents it, with nothing of its tree left and the server still
serving. The one row that kills the starter kills the worker's starter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import animators
import psutil
import pytest
from conftest import describe, is_alive, wait_for
from rest_support import LiveServer, assert_error
from test_faults import (
    FAULTS,
    TASKS,
    Fault,
    check_ended,
    fault_server,
    rest_create,
    rest_still_serves,
    rest_task,
    rest_terminal,
    watch_tree,
)

from rest.cli import RET_OK

pytest.importorskip("distributed")

#: The rows that need no SSE stream of their own (the event stream with
#: ``--dask local`` is tested in ``test_rest_server.py``).
ROWS = [fault for fault in FAULTS if fault.action != "subscriber"]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = fault_server("--dask", "local")
    try:
        live.start()
        yield live
        tree = live.tree()
        assert live.stop() == RET_OK, live.log()
        # NOTE: multiprocessing's resource tracker (started by the cluster's
        # nannies) exits on its own once the last of them is gone: soon, not at once
        wait_for(lambda: not any(is_alive(p) for p in tree),
                 message=lambda: str([describe(p) for p in tree if is_alive(p)]))
    finally:
        live.close()


def kill_workers_starter(info: dict[str, object], server_pid: int) -> None:
    """SIGKILL the starter of a task process, checking that it runs below the server
    (in a Dask worker process) and is not the server itself."""
    starter = psutil.Process(int(str(info["ppid"])))
    assert starter.pid != server_pid
    assert server_pid in [p.pid for p in starter.parents()], describe(starter)
    starter.kill()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ROWS, ids=lambda f: f.name)
def test_rest_on_dask(server: LiveServer, tmp_path: Path, fault: Fault) -> None:
    assert server.proc is not None
    body = {"operation": fault.operation, "args": fault.args_in(tmp_path)}
    if fault.action == "refuse":
        answer = server.post(TASKS, json=body)
        assert_error(answer.status_code, answer.json(), 400, *fault.says)
        rest_still_serves(server)
        return
    task_id = rest_create(server, body)["meta"]["id"]
    watched: list[psutil.Process] = []
    if fault.action in ("cancel", "kill-starter"):
        info = wait_for(lambda: animators.ready_info(rest_task(server, task_id)))
        watched = watch_tree(info)
        if fault.action == "cancel":
            answer = server.post(f"{TASKS}/{task_id}/cancel")
            assert answer.status_code == 200 and answer.json()["cancelRequested"] is True
        else:
            kill_workers_starter(info, server.proc.pid)
    task = rest_terminal(server, task_id)
    check_ended(fault, task, watched, psutil.Process(server.proc.pid), tmp_path)
    rest_still_serves(server)
