"""What only the Dask backend has to survive: lost workers, a lost scheduler, a
supervisor that dies without terminating. The behaviour both backends share is
tested in test_backends.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import animators
import distributed
import falcon.testing
import psutil
import pytest
import requests
from conftest import (
    SHARED_PROCESSES,
    TIMEOUT,
    free_port,
    kill_processes,
    message_texts,
    pids_gone,
    wait_for,
    wait_ready,
    wait_terminal,
)

import rest
from supervisor import BackendUnavailable, Manager
from supervisor.backends.dask import DaskBackend
from supervisor.backends.dask.backend import _Orphans
from supervisor.backends.dask.claims import TaskClaims
from supervisor.backends.dask.worker import RecentIds, _claim

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}


def _accepted(m: Any, create: dict[str, Any]) -> str | None:
    """run_task, or None while the backend refuses new tasks."""
    try:
        return m.run_task(create)  # type: ignore[no-any-return]
    except BackendUnavailable:
        return None


def _worker_of(info: dict[str, Any]) -> psutil.Process:
    """The Dask worker process that runs a task process (task → starter → worker; the
    ready message's ``ppid`` is the starter, also when an init is in between)."""
    return psutil.Process(info["ppid"]).parent()


def test_worker_killed_mid_task_fails_naming_it_and_is_not_rerun(
    manager: Any, dask_cluster: str, tmp_path: Path
) -> None:
    m = manager(backend=DaskBackend(dask_cluster), max_workers=2)
    m.register_animator("COUNT", animators.RunCounter())
    m.register_animator("FORKER", animators.Forker())
    runs = tmp_path / "runs"
    task_id = m.run_task({"operation": "COUNT", "args": {"file": str(runs)}})
    info = wait_ready(m, task_id)
    worker = _worker_of(info)
    assert "spawn_main" in " ".join(worker.cmdline())  # a LocalCluster worker process
    worker.send_signal(signal.SIGKILL)
    task = wait_terminal(m, task_id)
    assert task["state"] == "FAILED"
    assert any(text.startswith("the Dask worker tcp://127.0.0.1:")
               and text.endswith("running the task died or was removed")
               for text in message_texts(task)), task
    wait_for(lambda: pids_gone(info["pid"]), timeout=10)  # its starter killed the tree
    # Dask reschedules a task whose worker died; the second run must refuse.
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        def forgotten() -> bool:
            keys = client.run_on_scheduler(
                lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])
            return not any(key.endswith(f"-{task_id}") for key in keys)

        wait_for(forgotten)
        client.wait_for_workers(2, timeout=TIMEOUT)  # the nanny restarted it
    assert runs.read_text().count("\n") == 1
    # the cluster still serves
    again = m.run_task({"operation": "FORKER", "args": {"mode": "return"}})
    assert wait_terminal(m, again)["state"] == "SUCCEEDED"


def test_an_animator_that_opts_in_is_run_again_after_its_worker_died(
    manager: Any, dask_cluster: str, tmp_path: Path
) -> None:
    m = manager(backend=DaskBackend(dask_cluster), max_workers=2)
    m.register_animator("RERUN", animators.RerunOnce())
    runs = tmp_path / "runs"
    task_id = m.run_task({"operation": "RERUN", "args": {"file": str(runs)}})
    info = wait_ready(m, task_id)
    _worker_of(info).send_signal(signal.SIGKILL)
    task = wait_terminal(m, task_id, timeout=60)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"] == {"runs": 2}
    assert runs.read_text().count("\n") == 2
    wait_for(lambda: pids_gone(info["pid"]), timeout=10)
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=TIMEOUT)  # the nanny restarted it


def test_connection_blip_fails_the_task_and_stops_it_on_the_worker(
    manager: Any, dask_cluster: str
) -> None:
    backend = DaskBackend(dask_cluster, heartbeat=0.25)
    m = manager(backend=backend, max_workers=2, cancel_grace=0.5)
    m.register_animator("COOP", animators.Cooperative())
    m.register_animator("QUICK", animators.Quick())
    task_id = m.run_task({"operation": "COOP"})
    pid = wait_ready(m, task_id)["pid"]
    # fault injection: cut the client's connection to the scheduler; it reconnects
    client = backend._client
    client.loop.add_callback(lambda: client.scheduler_comm.comm.abort())
    task = wait_terminal(m, task_id)
    assert task["state"] == "FAILED"
    assert any("unreachable" in text for text in message_texts(task)), message_texts(task)
    # the worker side is told to stop once the scheduler answers again
    wait_for(lambda: pids_gone(pid), timeout=15)

    again = wait_for(lambda: _accepted(m, {"operation": "QUICK"}), timeout=30, interval=0.1)
    assert wait_terminal(m, again)["state"] == "SUCCEEDED"


def test_cancel_of_a_task_still_queued_in_dask(manager: Any, dask_cluster: str) -> None:
    # more tasks in flight than the cluster's two threads: one waits in Dask's queue
    m = manager(backend=DaskBackend(dask_cluster), max_workers=3, cancel_grace=5)
    m.register_animator("COOP", animators.Cooperative())
    ids = [m.run_task({"operation": "COOP"}) for _ in range(3)]
    wait_for(lambda: sum(animators.ready_info(m.get_task(i)) is not None for i in ids) == 2)
    waiting = next(i for i in ids if animators.ready_info(m.get_task(i)) is None)
    m.cancel_task(waiting)
    task = wait_terminal(m, waiting, timeout=5)
    assert task["state"] == "CANCELED", task
    # taken off Dask's queue, or refused by the worker side if it got there first:
    # either way it never ran, and it ends from NEW
    assert task["outcome"]["kind"] == "canceled-queued", task
    assert "State change NEW ⇒ CANCELED" in message_texts(task), task
    assert "usage" not in task
    for task_id in ids:
        if task_id != waiting:
            m.cancel_task(task_id)
            assert wait_terminal(m, task_id)["state"] == "CANCELED"


def test_two_supervisors_with_the_same_task_ids_share_the_workers(
    manager: Any, dask_cluster: str
) -> None:
    first = manager(backend=DaskBackend(dask_cluster), max_workers=2)
    second = manager(backend=DaskBackend(dask_cluster), max_workers=2)
    for m in (first, second):
        m.register_animator("QUICK", animators.Quick())
    runs = [(m, m.run_task({"operation": "QUICK", "args": {"who": name, "n": n}}), name, n)
            for n in range(10) for m, name in ((first, "first"), (second, "second"))]
    for m, task_id, name, n in runs:
        task = wait_terminal(m, task_id)
        assert task["state"] == "SUCCEEDED", task
        assert task["result"]["args"] == {"who": name, "n": n}
    assert {task_id for m, task_id, name, n in runs if m is first} == \
        {task_id for m, task_id, name, n in runs if m is second}  # the same ids, really


def test_each_supervisor_keeps_its_cancel_grace_on_shared_workers(
    manager: Any, dask_cluster: str
) -> None:
    short = manager(backend=DaskBackend(dask_cluster), max_workers=1, cancel_grace=0.5)
    long = manager(backend=DaskBackend(dask_cluster), max_workers=1, cancel_grace=2.5)
    ids = {}
    for m in (short, long):
        m.register_animator("STUBBORN", animators.Stubborn())
        ids[m] = m.run_task({"operation": "STUBBORN"})
    for m in (short, long):
        wait_ready(m, ids[m])
    canceled = time.monotonic()
    for m in (short, long):
        m.cancel_task(ids[m])
    first = wait_terminal(short, ids[short])
    second = wait_terminal(long, ids[long])
    assert time.monotonic() - canceled >= 2.5  # not the other supervisor's 0.5 s
    assert (first["state"], second["state"]) == ("CANCELED", "CANCELED")
    assert "killed after cancel grace period (0.5 s)" in message_texts(first), first
    assert "killed after cancel grace period (2.5 s)" in message_texts(second), second
    # one worker-side Manager per worker process, whatever the graces
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        def managers() -> int:
            import gc

            from supervisor import Manager
            return sum(isinstance(thing, Manager) for thing in gc.get_objects())

        assert set(client.run(managers).values()) <= {0, 1}


def test_supervisor_sigkilled_remote_trees_die_within_the_lease(dask_cluster: str) -> None:
    lease = 4.0
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "dask_supervisor.py"), dask_cluster, str(lease)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        pids = json.loads(line)
        assert len(pids) == 4 and not pids_gone(*pids)  # Forker + 2 children, Stubborn
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        killed = time.monotonic()
        wait_for(lambda: pids_gone(*pids), timeout=20)
        elapsed = time.monotonic() - killed
        print(f"remote trees gone {elapsed:.2f} s after the supervisor's SIGKILL "
              f"(lease {lease:g} s)")
        assert elapsed < 10, "remote trees outlived the 10 s bound"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- a scheduler of our own, to lose and bring back -------------------------------------


class Cluster:
    """A scheduler and workers as separate processes, so the scheduler can be killed."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def scheduler(self) -> None:
        self._start("distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                    "--port", str(self.port), "--dashboard-address", ":0")

    def worker(self) -> None:
        self._start("distributed.cli.dask_worker", self.address, "--nthreads", "1",
                    "--host", "127.0.0.1", "--dashboard-address", ":0")

    def _start(self, module: str, *args: str) -> None:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)

    def wait_for_workers(self, count: int) -> None:
        def ready() -> bool:
            try:
                with distributed.Client(self.address, set_as_default=False, timeout=2) as c:
                    return len(c.scheduler_info()["workers"]) >= count
            except OSError:
                return False

        wait_for(ready, timeout=60, interval=0.2)

    def close(self) -> None:
        procs = []
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        kill_processes(procs)
        for proc in self.procs:
            proc.wait(10)


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.scheduler()
        cluster.worker()
        cluster.wait_for_workers(1)
        yield cluster
    finally:
        cluster.close()


def test_scheduler_lost_fails_tasks_refuses_new_until_it_is_back(
    manager: Any, own_cluster: Cluster
) -> None:
    backend = DaskBackend(own_cluster.address, heartbeat=0.25, unreachable_after=1.0,
                          lease_timeout=3.0, connect_timeout=5.0)
    m = manager(backend=backend, max_workers=1, cancel_grace=0.5)
    m.register_animator("COOP", animators.Cooperative())
    m.register_animator("QUICK", animators.Quick())
    running = m.run_task({"operation": "COOP"})
    queued = m.run_task({"operation": "COOP"})
    pid = wait_ready(m, running)["pid"]
    assert m.get_task(queued)["state"] == "NEW"

    own_cluster.procs[0].send_signal(signal.SIGKILL)  # the scheduler
    task = wait_terminal(m, running)
    assert task["state"] == "FAILED"
    reason = f"the Dask scheduler at {own_cluster.address} is unreachable"
    assert any(text.startswith(reason) for text in message_texts(task)), message_texts(task)
    assert wait_terminal(m, queued)["state"] == "FAILED"
    with pytest.raises(BackendUnavailable, match="unreachable"):
        m.run_task({"operation": "QUICK"})
    api = falcon.testing.TestClient(rest.create_app(m))
    refused = api.simulate_post("/api/v1/tasks", json={"operation": "QUICK"})
    assert refused.status_code == 503 and "unreachable" in refused.json["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    wait_for(lambda: pids_gone(pid), timeout=10)  # the worker side's lease expired

    done = _quick_task_after_restart(m, own_cluster)
    assert done["state"] == "SUCCEEDED", done


def test_a_scheduler_lost_before_the_first_heartbeat_gets_the_claims_again(
    manager: Any, own_cluster: Cluster
) -> None:
    # the monitor has not heard from the scheduler yet when it goes: the new one
    # must still get the claims plugin (and the cancel of the task failed meanwhile)
    backend = DaskBackend(own_cluster.address, heartbeat=2.0, unreachable_after=1.0,
                          lease_timeout=6.0, connect_timeout=5.0)
    m = manager(backend=backend, max_workers=1, cancel_grace=0.5)
    m.register_animator("COOP", animators.Cooperative())
    m.register_animator("QUICK", animators.Quick())
    running = m.run_task({"operation": "COOP"})
    pid = wait_ready(m, running)["pid"]
    own_cluster.procs[0].send_signal(signal.SIGKILL)  # the scheduler
    assert wait_terminal(m, running)["state"] == "FAILED"
    wait_for(lambda: pids_gone(pid), timeout=20)
    assert _quick_task_after_restart(m, own_cluster)["state"] == "SUCCEEDED"


def _quick_task_after_restart(m: Any, cluster: Cluster) -> dict[str, Any]:
    """Start the killed scheduler again at the same address, with a worker; run a
    QUICK task once the manager takes one again; its terminal wire form."""
    cluster.procs[0].wait(10)
    cluster.scheduler()
    cluster.worker()
    task_id = wait_for(lambda: _accepted(m, {"operation": "QUICK"}), timeout=60, interval=0.2)
    return wait_terminal(m, task_id, timeout=60)


def test_worker_retired_mid_task_fails_naming_it_and_kills_the_tree(
    manager: Any, own_cluster: Cluster
) -> None:
    m = manager(backend=DaskBackend(own_cluster.address), max_workers=1, cancel_grace=30)
    m.register_animator("FORKER", animators.Forker())
    task_id = m.run_task({"operation": "FORKER"})
    info = wait_ready(m, task_id)
    with distributed.Client(own_cluster.address, set_as_default=False) as client:
        (address,) = client.scheduler_info()["workers"]
        client.retire_workers([address])
    task = wait_terminal(m, task_id)
    assert task["state"] == "FAILED"
    assert f"the Dask worker {address} running the task died or was removed" in \
        message_texts(task), message_texts(task)
    wait_for(lambda: pids_gone(info["pid"], *info["children"]), timeout=5)  # not the 30 s grace


def test_terminate_with_the_scheduler_gone_returns(manager: Any, own_cluster: Cluster) -> None:
    backend = DaskBackend(own_cluster.address, heartbeat=0.25, unreachable_after=30.0,
                          lease_timeout=3.0, connect_timeout=5.0)
    m: Manager = manager(backend=backend, max_workers=1, cancel_grace=0.5)
    m.register_animator("COOP", animators.Cooperative())
    task_id = m.run_task({"operation": "COOP"})
    pid = wait_ready(m, task_id)["pid"]
    own_cluster.procs[0].send_signal(signal.SIGKILL)
    started = time.monotonic()
    m.terminate()
    assert time.monotonic() - started < 30
    assert m.get_task(task_id)["state"] in ("CANCELED", "FAILED")  # ended by terminate()
    wait_for(lambda: pids_gone(pid), timeout=10)



# -- growth bounds ------------------------------------------------------------------------


def test_orphans_keep_the_newest_beyond_the_bound() -> None:
    orphans = _Orphans(limit=3)
    for n in range(5):
        orphans.add(f"k{n}")
    assert len(orphans) == 3 and orphans.dropped == 2
    taken = orphans.take(2)
    assert taken == ["k2", "k3"]
    orphans.add("k5")
    orphans.add("k6")  # four pending with the two taken: the oldest go
    orphans.put_back(taken[1:])  # the first was sent, the second failed
    assert len(orphans) == 3 and orphans.dropped == 3
    assert orphans.take(10) == ["k4", "k5", "k6"]
    assert orphans.take(10) == []


def test_task_claims_refuse_a_second_run_and_keep_cancels() -> None:
    claims = TaskClaims()
    assert claims.claim("a", "tcp://w1", rerun=False) == "run"
    assert claims.claim("a", "tcp://w2", rerun=False) == "refused"  # its worker died
    assert claims.claim("b", "tcp://w1", rerun=True) == "run"
    assert claims.claim("b", "tcp://w2", rerun=True) == "run"  # opted in
    assert claims.cancel(["c"]) == {"c": "queued"}
    assert claims.claim("c", "tcp://w1", rerun=True) == "canceled"  # never runs
    claims.forget(["a", "c"])
    assert claims.claim("a", "tcp://w1", rerun=False) == "run"
    assert claims.claim("c", "tcp://w1", rerun=False) == "run"


def test_task_claims_pass_a_cancel_on_to_the_claiming_worker() -> None:
    sent: list[tuple[str, list[str]]] = []

    class Worker:
        def __init__(self, address: str) -> None:
            self.address = address

        async def housekeeping_cancel(self, keys: list[str]) -> None:
            sent.append((self.address, keys))

    class Scheduler:
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def rpc(self, address: str) -> Worker:
            return Worker(address)

    async def scenario() -> None:
        claims = TaskClaims()
        await claims.start(Scheduler())
        assert claims.claim("a", "tcp://w1", rerun=True) == "run"
        assert claims.cancel(["a", "b"]) == {"a": "running", "b": "queued"}
        await asyncio.wait_for(asyncio.gather(*claims._sending), TIMEOUT)
        assert sent == [("tcp://w1", ["a"])]
        # a second run after its worker died does not start either
        assert claims.claim("a", "tcp://w2", rerun=True) == "canceled"

    asyncio.run(scenario())


def test_a_run_registers_the_claims_on_a_scheduler_without_them() -> None:
    """A scheduler restarted since its supervisors registered the plugin: the first
    run there registers it (a new scheduler holds no earlier run of a task)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        spec = {"key": "housekeeping-test-1", "rerun": False}

        def claim_twice() -> list[str]:
            worker = distributed.get_worker()
            return [_claim(worker, spec), _claim(worker, spec)]

        assert client.submit(claim_twice, pure=False).result(timeout=TIMEOUT) == \
            ["run", "refused"]


def test_task_claims_keep_a_bounded_number_of_records(monkeypatch: pytest.MonkeyPatch) -> None:
    import supervisor.backends.dask.claims as module

    monkeypatch.setattr(module, "MAX_RECORDS", 3)
    claims = TaskClaims()
    assert claims.cancel([f"k{n}" for n in range(5)]) == {f"k{n}": "queued" for n in range(5)}
    assert claims.dropped == 2
    # the two oldest cancels were dropped: those runs go ahead
    assert [claims.claim(f"k{n}", "tcp://w", rerun=False) for n in (4, 3, 2, 1, 0)] == \
        ["canceled", "canceled", "canceled", "run", "run"]


def test_retired_ids_keep_only_the_newest() -> None:
    retired = RecentIds(limit=3)
    for n in range(5):
        retired.add(f"t{n}")
    retired.add("t2")  # seen again: the newest now
    retired.add("t5")
    assert len(retired) == 3
    assert [f"t{n}" in retired for n in range(6)] == [False, False, True, False, True, True]


# -- ports ------------------------------------------------------------------------------


def _listening(procs: list[psutil.Process]) -> set[int]:
    ports = set()
    for proc in procs:
        try:
            ports |= {c.laddr.port for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return ports


def _dask_ports(address: str) -> set[int]:
    """The ports of the scheduler, its workers and their nannies."""
    with distributed.Client(address, set_as_default=False) as client:
        info = client.scheduler_info(n_workers=-1)
    addresses = [address, *info["workers"],
                 *(worker["nanny"] for worker in info["workers"].values())]
    return {int(a.rsplit(":", 1)[1]) for a in addresses}


def _tree() -> list[psutil.Process]:
    """This process and its descendants; multiprocessing's resource tracker, which
    the cluster's nannies start and which lives as long as this process, is left
    to the session."""
    me = psutil.Process()
    tree = [me, *me.children(recursive=True)]
    for proc in tree:
        try:
            if "multiprocessing.resource_tracker" in " ".join(proc.cmdline()):
                SHARED_PROCESSES.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return tree


def test_the_local_cluster_opens_a_dashboard_only_when_asked(manager: Any) -> None:
    before = _listening(_tree())  # NOTE: a shared cluster's ports too
    backend = DaskBackend.local(1)
    m = manager(backend=backend, max_workers=1)
    m.register_animator("QUICK", animators.Quick())
    assert wait_terminal(m, m.run_task({"operation": "QUICK"}))["state"] == "SUCCEEDED"
    opened = _listening(_tree()) - before
    assert opened == _dask_ports(backend.address)  # no dashboard, no worker HTTP
    m.terminate()

    backend = DaskBackend.local(1, dashboard_address="127.0.0.1:0")
    m = manager(backend=backend, max_workers=1)
    extra = _listening(_tree()) - before - _dask_ports(backend.address)
    assert len(extra) == 1, extra
    (port,) = extra
    answer = requests.get(f"http://127.0.0.1:{port}/health", timeout=TIMEOUT)
    assert answer.status_code == 200 and answer.text == "ok"


def test_serve_dask_local_opens_no_port_for_dask_nor_hints_at_a_proxy() -> None:
    from rest_support import LiveServer

    live = LiveServer("--dask", "local", "--max-workers", "2", "--no-demo")
    try:
        live.start()
        found = re.search(r"tasks run on the Dask cluster at (tcp://\S+)", live.log())
        assert found, live.log()
        rest_port = int(live.url.rsplit(":", 1)[1].split("/")[0])
        assert _listening(live.tree()) == {rest_port} | _dask_ports(found[1])
        assert live.stop() == 0, live.log()
        assert "jupyter-server-proxy" not in live.log()
        assert "dashboard" not in live.log().lower()
    finally:
        live.close()


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--dask-dashboard", "127.0.0.1:0"], 2, "needs --dask local"),
    (["--dask", "local", "--dask-dashboard", "8787"], 2, "give HOST:PORT"),
    (["--dask", "local", "--dask-dashboard", "192.0.2.1:8787"], 3, "no authentication"),
])
def test_serve_refuses_a_dask_dashboard_it_cannot_serve_safely(
    args: list[str], code: int, words: str
) -> None:
    from rest_support import LiveServer

    live = LiveServer(*args)
    try:
        returncode, _, stderr = live.run_to_exit()
    finally:
        live.close()
    assert returncode == code, stderr
    assert words in stderr, stderr


# -- packaging and the command line ------------------------------------------------------


def test_the_core_does_not_import_distributed() -> None:
    code = (
        "import sys, supervisor, workers.child, workers.starter, rest, rest.cli, rest.app\n"
        "from supervisor import Manager\n"
        "Manager(max_workers=1).terminate()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('distributed', 'dask'))\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_serve_with_an_unreachable_scheduler_exits_with_its_code() -> None:
    from rest.cli import RET_DASK

    done = subprocess.run(
        [sys.executable, "-m", "rest", "serve", "--port", "0", "--dask",
         f"tcp://127.0.0.1:{free_port()}"],
        env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == RET_DASK, done.stderr
    assert "cannot reach the scheduler" in done.stderr


def test_the_sandbox_applies_on_the_workers(manager: Any, dask_cluster: str) -> None:
    """The operation's sandbox goes with the task: on the worker, the task process is in
    a PID namespace of its own, as a dynamic user, and the operation shows it."""
    import containment_animators

    from supervisor import Sandbox
    from supervisor.sandbox import pid_namespaces_permitted

    if not pid_namespaces_permitted() or os.geteuid() != 0:
        pytest.skip("needs root with CAP_SYS_ADMIN (PID namespaces, dynamic users)")
    m = manager(backend=DaskBackend(dask_cluster), max_workers=2)
    m.register_animator("ID", containment_animators.Identity(),
                        sandbox=Sandbox(private_pids=True, user="dynamic"))
    assert m.operations()[0]["sandbox"]["privatePids"] is True
    task = wait_terminal(m, m.run_task({"operation": "ID"}))
    assert task["state"] == "SUCCEEDED", message_texts(task)
    seen = task["result"]
    assert len(seen["nspid"]) == 2 and seen["pid"] >= 2, seen
    assert 61184 <= seen["uid"] <= 65519 and seen["groups"] == [], seen
