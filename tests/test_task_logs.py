"""Task logs in the library: what a task's processes write is captured per task,
bounded, readable by seq and followable live (``Manager.get_log`` / ``subscribe_log``)."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import log_animators as la
import pytest
from conftest import wait_for, wait_state, wait_terminal
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import TaskNotFound
from supervisor.tasklog import BLOCK_OVERHEAD, MAX_LINE_BYTES, TaskLog

KIB = 1024


def complete_log(m: Any, task_id: str) -> dict[str, Any]:
    """Poll until the task's log is complete; return it."""
    found: list[dict[str, Any]] = []

    def done() -> bool:
        found[:] = [m.get_log(task_id)]
        return bool(found[0]["complete"])

    wait_for(done, message=lambda: found)
    return found[0]


def texts(log: dict[str, Any]) -> list[tuple[str, str]]:
    return [(line["stream"], line["text"]) for line in log["lines"]]


# -- capture through real task processes -----------------------------------------------


def test_stdout_stderr_logging_and_programs_are_captured_in_order(manager: Any) -> None:
    m = manager()
    m.register_animator("CHATTY", la.Chatty())
    task_id = m.run_task({"operation": "CHATTY"})
    assert wait_terminal(m, task_id)["state"] == "SUCCEEDED"
    log = complete_log(m, task_id)
    got = texts(log)
    # NOTE: one pipe per stream: the order holds within a stream, and across streams
    # for writes that the loop read apart (each print is a write of its own).
    assert [t for t in got if t[0] == "stdout"] == [
        ("stdout", "out 1"), ("stdout", "out 2"), ("stdout", "from a program"),
        ("stdout", "from a grandchild"), ("stdout", "no newline at the end")]
    assert [t for t in got if t[0] == "stderr"] == [
        ("stderr", "err 1"), ("stderr", "INFO chatty.part: info record"),
        ("stderr", "program err")]
    assert [line["seq"] for line in log["lines"]] == list(range(1, 9))
    assert log["next"] == 8 and log["dropped"] == 0
    for line in log["lines"]:
        assert line["time"].endswith("Z") and line["time"][10] == "T"


def test_task_output_never_reaches_the_supervisors_own_streams(
        manager: Any, capfd: pytest.CaptureFixture[str]) -> None:
    m = manager()  # NOTE: made under capfd, so its starter writes to the captured fds
    m.register_animator("CHATTY", la.Chatty())
    task_id = m.run_task({"operation": "CHATTY"})
    complete_log(m, task_id)
    out, err = capfd.readouterr()
    assert "out 1" not in out + err and "program err" not in out + err, (out, err)


def test_an_animator_that_configures_logging_keeps_its_records(
        manager: Any, tmp_path: Any) -> None:
    m = manager()
    m.register_animator("OWN", la.OwnLogging())
    path = tmp_path / "own.log"
    task_id = m.run_task({"operation": "OWN", "args": {"path": str(path)}})
    assert texts(complete_log(m, task_id)) == [("stdout", "printed")]
    assert "to my file" in path.read_text()


def test_a_flood_is_kept_bounded_to_the_newest_lines(manager: Any) -> None:
    m = manager(log_limit=1024 * KIB)
    m.register_animator("FLOOD", la.Flood())
    task_id = m.run_task({"operation": "FLOOD", "args": {"mib": 20}})
    task = wait_terminal(m, task_id)
    assert task["state"] == "SUCCEEDED", task
    written = json.loads(json.dumps(task["result"]))
    log = complete_log(m, task_id)
    lines = log["lines"]
    assert lines[-1]["text"] == f"{written - 1:099d}"  # the newest line is kept
    assert log["dropped"] + len(lines) == written  # every line is kept or counted
    kept = sum(len(line["text"]) + 1 for line in lines)
    assert 900 * KIB < kept <= 1024 * KIB, kept
    assert [line["seq"] for line in lines] == list(range(log["dropped"] + 1, written + 1))
    totals = m.log_totals()[("FLOOD", "stdout")]
    assert totals == (written * 100, log["dropped"])


def test_bytes_that_are_not_utf8_and_long_lines(manager: Any) -> None:
    m = manager()
    m.register_animator("RAW", la.RawBytes())
    task_id = m.run_task({"operation": "RAW"})
    log = complete_log(m, task_id)
    out = [line["text"] for line in log["lines"] if line["stream"] == "stdout"]
    err = [line["text"] for line in log["lines"] if line["stream"] == "stderr"]
    assert out == ["bad \ufffd\ufffd bytes"]
    assert [len(text) for text in err] == [MAX_LINE_BYTES] * 6 + [100 * KIB - 6 * MAX_LINE_BYTES]
    assert "".join(err) == "x" * (100 * KIB)


def test_paging_with_after_and_limit(manager: Any) -> None:
    m = manager()
    m.register_animator("CHATTY", la.Chatty())
    task_id = m.run_task({"operation": "CHATTY"})
    whole = complete_log(m, task_id)
    first = m.get_log(task_id, limit=3)
    assert [line["seq"] for line in first["lines"]] == [1, 2, 3]
    assert first["next"] == 3 and first["complete"] is False  # more to read
    rest = m.get_log(task_id, after=first["next"])
    assert first["lines"] + rest["lines"] == whole["lines"] and rest["complete"]
    nothing = m.get_log(task_id, after=rest["next"])
    assert nothing["lines"] == [] and nothing["next"] == rest["next"]
    for bad in ({"after": -1}, {"limit": 0}, {"after": "1"}, {"limit": True}):
        with pytest.raises(ValueError):
            m.get_log(task_id, **bad)
    with pytest.raises(TaskNotFound):
        m.get_log("NOPE000001")


def test_the_log_is_purged_with_its_task(manager: Any) -> None:
    m = manager(purge_delay=0.2)
    m.register_animator("CHATTY", la.Chatty())
    task_id = m.run_task({"operation": "CHATTY"})
    ended: queue.Queue[dict[str, Any]] = queue.Queue()
    m.subscribe_log(task_id, lambda line: "end" in line and ended.put(line))

    def purged() -> bool:
        try:
            m.get_log(task_id)
        except TaskNotFound:
            return True
        return False

    wait_for(purged)
    assert ended.get(timeout=10)["end"] in {"complete", "purged"}


def test_a_task_that_never_started_has_a_complete_empty_log(manager: Any) -> None:
    m = manager(max_workers=1)
    m.register_animator("PRINTER", la.Printer())
    running = m.run_task({"operation": "PRINTER"})
    queued = m.run_task({"operation": "PRINTER"})
    ends: queue.Queue[dict[str, Any]] = queue.Queue()
    m.subscribe_log(queued, ends.put)
    m.cancel_task(queued)
    assert ends.get(timeout=10) == {"end": "complete", "next": 0}
    assert m.get_log(queued) == {"lines": [], "next": 0, "dropped": 0, "complete": True}
    m.cancel_task(running)


# -- following ---------------------------------------------------------------------


def test_a_follower_gets_lines_live_then_the_end(manager: Any) -> None:
    m = manager()
    m.register_animator("PRINTER", la.Printer())
    task_id = m.run_task({"operation": "PRINTER"})
    wait_for(lambda: m.get_log(task_id)["lines"])
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    unsubscribe = m.subscribe_log(task_id, got.put, after=0)
    first = got.get(timeout=10)
    assert (first["seq"], first["stream"], first["text"]) == (1, "stdout", "first line")
    assert m.get_task(task_id)["state"] == "ACTIVE"  # NOTE: delivered before it ended
    m.cancel_task(task_id)
    second = got.get(timeout=10)
    assert (second["seq"], second["text"]) == (2, "canceled, bye")
    assert got.get(timeout=10) == {"end": "complete", "next": 2}
    assert wait_state(m, task_id, "CANCELED")["state"] == "CANCELED"
    unsubscribe()


def test_a_follower_without_after_sees_only_new_lines(manager: Any) -> None:
    m = manager()
    m.register_animator("PRINTER", la.Printer())
    task_id = m.run_task({"operation": "PRINTER"})
    wait_for(lambda: m.get_log(task_id)["lines"])
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    m.subscribe_log(task_id, got.put)
    m.cancel_task(task_id)
    assert got.get(timeout=10)["text"] == "canceled, bye"
    assert got.get(timeout=10)["end"] == "complete"


def test_a_slow_follower_is_dropped_and_told_where_it_was(manager: Any) -> None:
    m = manager()
    m.register_animator("FLOOD", la.Flood())
    release = threading.Event()
    got: list[dict[str, Any]] = []

    def slow(line: dict[str, Any]) -> None:
        release.wait(30)
        got.append(line)

    task_id = m.run_task({"operation": "FLOOD", "args": {"mib": 20}})
    m.subscribe_log(task_id, slow)
    log = complete_log(m, task_id)
    release.set()
    wait_for(lambda: got and "end" in got[-1])
    if got[-1]["end"] == "behind":  # NOTE: the backlog bounds of events decide
        assert got[-1]["next"] == (got[-2]["seq"] if len(got) > 1 else 0)
    else:
        assert len(got) - 1 == log["next"]


# -- the store itself ------------------------------------------------------------------


def new_log(limit: int = 1024 * KIB) -> TaskLog:
    return TaskLog(limit, 10_000, 64 * 1024 * 1024)


def test_lines_split_across_reads_and_flushed_at_the_end() -> None:
    log = new_log()
    assert log.feed(0, b"hel", 1.0) == 0
    log.feed(0, b"lo\nwor", 2.0)
    log.feed(1, b"e\n", 2.5)
    log.feed(0, b"ld", 3.0)
    log.flush(0, 4.0)
    lines, after = log.read()
    assert [(line["stream"], line["text"]) for line in lines] == [
        ("stdout", "hello"), ("stderr", "e"), ("stdout", "world")]
    assert after == 3


def test_a_long_line_is_cut_at_a_character_boundary() -> None:
    log = new_log()
    text = "é" * MAX_LINE_BYTES  # two bytes each: no cut may split one
    log.feed(0, text.encode() + b"\n", 1.0)
    lines, _ = log.read()
    assert "".join(line["text"] for line in lines) == text
    assert all("\ufffd" not in line["text"] for line in lines)
    assert all(len(line["text"].encode()) <= MAX_LINE_BYTES for line in lines)


def test_tiny_writes_are_bounded_by_their_bookkeeping_too() -> None:
    log = new_log(limit=64 * KIB)
    for _ in range(20_000):
        log.feed(0, b"\n", 1.0)
    kept, _ = log.read()
    assert len(kept) * (1 + BLOCK_OVERHEAD) <= 64 * KIB
    assert len(kept) + log.dropped == 20_000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.binary(max_size=300)), max_size=40),
       st.integers(200, 4000))
def test_every_line_is_kept_or_counted_and_the_newest_fit(
        writes: list[tuple[int, bytes]], limit: int) -> None:
    log = new_log(limit)
    for stream, data in writes:
        log.feed(stream, data, 1.0)
    for stream in (0, 1):
        log.flush(stream, 2.0)
    lines, after = log.read()
    expected = []
    for stream in (0, 1):
        whole = b"".join(data for s, data in writes if s == stream)
        expected.extend(whole.split(b"\n")[:-1] + ([whole.rsplit(b"\n", 1)[-1]]
                                                    if whole and not whole.endswith(b"\n")
                                                    else []))
    total = log.next_seq - 1
    assert len(lines) + log.dropped == total
    assert [line["seq"] for line in lines] == list(range(log.dropped + 1, total + 1))
    assert log.size <= limit
    if lines:
        assert after == lines[-1]["seq"]
    # every kept line decodes one written line (or a 16 KiB piece of it)
    decoded = {bytes_.decode("utf-8", "replace") for bytes_ in expected}
    assert all(line["text"] in decoded for line in lines)


# -- on either backend -------------------------------------------------------------------


def test_the_same_log_api_answers_on_either_backend(backend_manager: Any) -> None:
    """On Dask the worker captures the same way and forwards its lines in batches."""
    m = backend_manager()
    m.register_animator("CHATTY", la.Chatty())
    m.register_animator("PRINTER", la.Printer())
    task_id = m.run_task({"operation": "CHATTY"})
    assert wait_terminal(m, task_id)["state"] == "SUCCEEDED"
    log = complete_log(m, task_id)
    assert sorted(texts(log)) == sorted([
        ("stdout", "out 1"), ("stdout", "out 2"), ("stdout", "from a program"),
        ("stdout", "from a grandchild"), ("stdout", "no newline at the end"),
        ("stderr", "err 1"),
        ("stderr", "INFO chatty.part: info record"), ("stderr", "program err")])
    assert [line["text"] for line in log["lines"] if line["stream"] == "stdout"] == [
        "out 1", "out 2", "from a program", "from a grandchild", "no newline at the end"]
    # a line of a running task arrives before it ends
    running = m.run_task({"operation": "PRINTER"})
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    m.subscribe_log(running, got.put, after=0)
    assert got.get(timeout=30)["text"] == "first line"
    assert m.get_task(running)["state"] == "ACTIVE"
    m.cancel_task(running)
    assert got.get(timeout=30)["text"] == "canceled, bye"
    assert got.get(timeout=30)["end"] == "complete"


def _reference_lines(whole: bytes) -> list[bytes]:
    """How a stream's bytes become lines: at "\\n", long ones cut at 16 KiB (between
    characters), an open last line flushed."""
    from supervisor.tasklog import _utf8_prefix

    raw = whole.split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    lines = []
    for line in raw:
        while len(line) > MAX_LINE_BYTES:
            piece = _utf8_prefix(line, MAX_LINE_BYTES)
            lines.append(piece)
            line = line[len(piece):]
        lines.append(line)
    return lines


_CHUNKS = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda count, unit: unit * count, st.integers(1, 20_000),
              st.sampled_from([b"a", b"\xc3\xa9", b"\xff", b"ab\n", b"\n"])))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), _CHUNKS), max_size=30))
def test_lines_are_the_streams_split_as_documented(writes: list[tuple[int, bytes]]) -> None:
    log = new_log(limit=1 << 30)
    for stream, data in writes:
        log.feed(stream, data, 1.0)
    for stream in (0, 1):
        log.flush(stream, 2.0)
    lines, _ = log.read()
    assert log.dropped == 0
    for stream, name in enumerate(("stdout", "stderr")):
        whole = b"".join(data for s, data in writes if s == stream)
        assert [line["text"] for line in lines if line["stream"] == name] == [
            piece.decode("utf-8", "replace") for piece in _reference_lines(whole)]
