"""The pipe messages and the restricted decoder that guards the supervisor."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import protocol
from supervisor.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_RESULT_BYTES,
    Cancel,
    Exited,
    Finished,
    Note,
    Ping,
    Pong,
    Preload,
    Progress,
    ProtocolError,
    Ready,
    Spawn,
    SpawnFailed,
    Start,
    StateChanged,
    Stop,
    check_progress,
    decode,
    encode,
)

MESSAGES = [
    Start(task_json=b'{"meta": {"id": "T1"}, "args": {"a": [1, 2]}}', animator=b"\x80\x05.",
          sys_path=("/a", "/b"), main_path=None, max_memory=256 * 1024 * 1024),
    Cancel(),
    Ready(pid=1234),
    Progress(values={"percent_complete": 40, "total_bytes": 100}, timestamp=1.5),
    StateChanged(state="WAITING"),
    Note(text="hello ⇒ world"),
    Finished(state="SUCCEEDED", result_json='{"digest": "00"}'),
    Finished(state="FAILED", reason="RuntimeError: boom", traceback="Traceback ...",
             error_type="RuntimeError"),
    Spawn(token=7),
    SpawnFailed(token=7, error="BlockingIOError: [Errno 11] Resource temporarily unavailable"),
    Ping(seq=3),
    Pong(seq=3),
    Preload(modules=("animators",), sys_path=("/x",)),
    Stop(),
    Exited(pid=99, exitcode=-9),
]


class Evil:
    """Run a shell command when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@dataclasses.dataclass(frozen=True)
class Note2:
    """A look-alike of Note defined outside the protocol module."""

    text: str


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    data = encode(message)
    assert isinstance(data, bytes)
    decoded = decode(data)
    assert decoded == message
    assert type(decoded) is type(message)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_are_frozen(message):
    field = next(iter(dataclasses.fields(message)), None)
    if field is None:
        return
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(message, field.name, None)


def test_code_execution_refused(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(Evil(marker))
    with pytest.raises(ProtocolError, match="system"):
        decode(data)
    assert not marker.exists()


def test_code_execution_nested_in_a_message_refused(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(Note(text=Evil(marker)))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        decode(data)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1},
        [Note("x")],
        "text",
        42,
        None,
        Note2("look-alike"),
        ProtocolError("not a message"),
    ],
    ids=["dict", "list", "str", "int", "None", "look-alike", "protocol-error"],
)
def test_non_messages_refused(value):
    with pytest.raises(ProtocolError):
        decode(pickle.dumps(value))


def test_renamed_module_refused():
    data = pickle.dumps(Note("x"), protocol=4)
    forged = data.replace(b"supervisor.protocol", b"supervisor.protocoX")
    assert forged != data
    with pytest.raises(ProtocolError):
        decode(forged)


@pytest.mark.parametrize("data", [b"", b"\x80", b"not a pickle", encode(Note("hi"))[:-4]])
def test_garbage_refused(data):
    with pytest.raises(ProtocolError):
        decode(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data):
    try:
        message = decode(data)
    except ProtocolError:
        return
    assert type(message) in {type(m) for m in MESSAGES}


@given(st.text(max_size=500))
def test_note_text_round_trips(text):
    assert decode(encode(Note(text))) == Note(text)


def test_a_full_result_fits_in_a_message():
    assert MAX_RESULT_BYTES == 1024 * 1024
    biggest = Finished(state="SUCCEEDED", result_json='"' + "é" * (MAX_RESULT_BYTES // 2) + '"')
    assert len(encode(biggest)) <= MAX_MESSAGE_BYTES


def test_check_progress_clamps_and_validates():
    assert check_progress({"percent_complete": 150}) == {"percent_complete": 100}
    assert check_progress({"percent_complete": -3}) == {"percent_complete": 0}
    assert check_progress({"percent_complete": 12.9, "total_bytes": None}) == {
        "percent_complete": 12
    }
    assert check_progress({"offset_bytes": 7, "transferred_bytes": 0}) == {
        "offset_bytes": 7, "transferred_bytes": 0,
    }
    with pytest.raises(TypeError):
        check_progress({"percent": 1})
    with pytest.raises(TypeError):
        check_progress({"total_bytes": "10"})
    with pytest.raises(TypeError):
        check_progress({"total_bytes": True})
    with pytest.raises(ValueError):
        check_progress({"total_bytes": -1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_progress_refuses_non_finite_numbers(value):
    # The parent runs this on what a child sent, and catches TypeError and ValueError.
    with pytest.raises((TypeError, ValueError)):
        check_progress({"total_bytes": value})


def test_every_message_class_is_decodable():
    names = {name for name, value in vars(protocol).items()
             if dataclasses.is_dataclass(value) and isinstance(value, type)}
    assert names == {type(m).__name__ for m in MESSAGES}
