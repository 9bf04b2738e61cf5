"""Animators that write to their output, for the task log tests.

Task processes import this module by name, so it stays light to import.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

from supervisor import Animator


def _args(ops: Any) -> dict[str, Any]:
    return ops.task.get("args") or {}


class Chatty(Animator):
    """stdout and stderr in turn, a logging record, a program's output, an open last line."""

    def execute(self, ops: Any) -> str:
        print("out 1")
        print("err 1", file=sys.stderr)
        print("out 2")
        logging.getLogger("chatty.part").info("info record")
        logging.getLogger("chatty.part").debug("debug record")  # NOTE: below INFO: not kept
        subprocess.run(["sh", "-c", "echo from a program; "
                        "sh -c 'echo from a grandchild; true'; echo program err >&2"],
                       check=True)
        sys.stdout.write("no newline at the end")
        return "done"


class OwnLogging(Animator):
    """Configures logging itself (to a file): its records must not reach the task log."""

    def execute(self, ops: Any) -> None:
        logging.basicConfig(filename=_args(ops)["path"], level=logging.INFO)
        logging.getLogger("own").info("to my file")
        print("printed")


class Flood(Animator):
    """Write ``mib`` MiB of numbered 100-byte lines to stdout as fast as it can."""

    def execute(self, ops: Any) -> int:
        lines = _args(ops)["mib"] * 1024 * 1024 // 100
        chunk = 655  # lines per write: about 64 KiB
        number = 0
        while number < lines:
            count = min(chunk, lines - number)
            os.write(1, b"".join(b"%099d\n" % (number + i) for i in range(count)))
            number += count
        return number


class RawBytes(Animator):
    """Bytes that are not UTF-8, and one line of 100 KiB."""

    def execute(self, ops: Any) -> None:
        os.write(1, b"bad \xff\xfe bytes\n")
        os.write(2, b"x" * (100 * 1024) + b"\n")


class Printer(Animator):
    """Print ``first``, then one more line when canceled (its log must still follow)."""

    def execute(self, ops: Any) -> None:
        print(_args(ops).get("first", "first line"))
        deadline = time.monotonic() + 60
        while not ops.is_canceled() and time.monotonic() < deadline:
            time.sleep(0.01)
        print("canceled, bye")
        ops.set_state("CANCELED")
