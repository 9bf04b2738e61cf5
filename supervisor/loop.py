"""The manager's event loop: uvloop in one dedicated thread.

Every child's pipe and pidfd, the starter's socket and pidfd, and every timer
(purge, cancel grace, timeout) live on this loop: no thread per child and no
polling. Other threads hand work over with :meth:`LoopThread.call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class LoopThread:
    """A thread running one event loop until :meth:`stop`.

    NOTE: the starter is started from this thread on purpose: its
    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked it exits, and this
    thread lives exactly as long as the manager.
    """

    def __init__(self, name: str) -> None:
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread and wait until its loop runs."""
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._ready.set()
        await self._stopped.wait()

    def in_loop(self) -> bool:
        """True when called from the loop's own thread."""
        return threading.current_thread() is self.thread

    def call(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` soon on the loop (from any thread)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(callback, *args)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result (not from the loop)."""
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and join its thread."""
        if self.loop is not None and self._stopped is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
        self.thread.join(timeout)
