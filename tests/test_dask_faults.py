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

import psutil
import pytest
from conftest import describe
from rest_support import LiveServer, serving
from test_faults import FAULTS, Fault, fault_server, rest_row

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    # NOTE: multiprocessing's resource tracker (started by the cluster's
    # nannies) exits on its own once the last of them is gone: soon, not at once
    with serving(fault_server("--dask", "local"), stragglers_exit=True) as live:
        yield live


def kill_workers_starter(info: dict[str, object], server_pid: int) -> None:
    """SIGKILL the starter of a task process, checking that it runs below the server
    (in a Dask worker process) and is not the server itself."""
    starter = psutil.Process(int(str(info["ppid"])))
    assert starter.pid != server_pid
    assert server_pid in [p.pid for p in starter.parents()], describe(starter)
    starter.kill()


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_rest_on_dask(server: LiveServer, tmp_path: Path, fault: Fault) -> None:
    rest_row(server, tmp_path, fault, kill_workers_starter)
