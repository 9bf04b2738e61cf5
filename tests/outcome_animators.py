"""Animators that end in each outcome kind; for ``serve --animators outcome_animators:register``.

Each operation of :data:`REGISTRY` produces one kind when run with the
registered limits (``canceled-*`` kinds also need the test's cancel or
terminate; ``lost`` needs the test to kill the starter).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import animators
import containment_animators
import hostile_animators

from supervisor import Animator, Sandbox, TaskState


def _args(ops: Any) -> dict[str, Any]:
    return ops.task.get("args") or {}


class FailByAnimator(Animator):
    """Say FAILED through the task's API."""

    def execute(self, ops: Any) -> Any:
        ops.set_state(TaskState.FAILED)


class Garbage(Animator):
    """Write a frame that is not a protocol message on the task's pipe, then linger."""

    def execute(self, ops: Any) -> Any:
        hostile_animators.write_raw(ops, len(b"junk").to_bytes(4, "big") + b"junk")
        time.sleep(60)


class CpuBurner(Animator):
    """Burn ``args.seconds`` of CPU (its own process's), then return what it used."""

    def execute(self, ops: Any) -> Any:
        seconds = float(_args(ops).get("seconds", 0.3))
        start = time.process_time()
        while time.process_time() - start < seconds:
            sum(range(1000))
        return time.process_time() - start


class Allocator(Animator):
    """Allocate and touch ``args.mib`` MiB, keep them while it returns their size."""

    def execute(self, ops: Any) -> Any:
        size = int(_args(ops).get("mib", 200)) << 20
        block = bytearray(size)
        for offset in range(0, size, 4096):  # NOTE: touched, so that it is resident
            block[offset] = 1
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ExitWith(Animator):
    """Leave with ``os._exit(args.code)`` and no report."""

    def execute(self, ops: Any) -> Any:
        os._exit(int(_args(ops).get("code", 3)))


#: operation -> (animator, register_animator keywords)
REGISTRY: dict[str, tuple[Any, dict[str, Any]]] = {
    "RETURN": (animators.Quick(), {}),
    "COOPERATIVE": (animators.Cooperative(), {}),
    "STUBBORN": (animators.Stubborn(), {}),
    "RAISE": (animators.Raise(), {}),
    "FAIL": (FailByAnimator(), {}),
    "EXIT": (ExitWith(), {}),
    "SEGFAULT": (animators.Segfault(), {}),
    "TIMEOUT": (animators.Stubborn(), {"timeout": 0.5}),
    "MEMORY": (animators.MemoryHog(), {"max_memory": 512 << 20}),
    "CPU": (containment_animators.BurnCpu(), {"sandbox": Sandbox(max_cpu_seconds=1)}),
    "RESULT": (animators.BadResult(), {}),
    "PROTOCOL": (Garbage(), {}),
    "BURN": (CpuBurner(), {}),
    "ALLOCATE": (Allocator(), {}),
}


def register(manager: Any) -> None:
    """Register every operation of :data:`REGISTRY`."""
    for operation, (animator, limits) in REGISTRY.items():
        manager.register_animator(operation, animator, **limits)
