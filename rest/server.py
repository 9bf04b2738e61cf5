"""Serve the app with waitress, and stop it in order.

Threads of a running server::

    main thread      waits for SIGTERM/SIGINT, then runs the shutdown below
    waitress loop    accepts and reads/writes sockets (wasyncore, own thread)
    waitress-N       run requests; an event stream holds one for its life
    manager threads  the supervisor's own (event delivery, uvloop, ...)

Shutdown order (:meth:`Server.serve_until_stopped`), each step logged at debug:

1. stop accepting: close the listening sockets (in the loop thread);
2. end the event streams, so their threads are free;
3. terminate the manager: cancel, wait ``cancel_grace``, kill, reap;
4. let in-flight requests finish (bounded), close every connection, join
   the loop thread.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import resource
import signal
import socket
import struct
import termios
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO, cast

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from rest.errors import JSON_TYPE, encode_json

if TYPE_CHECKING:
    from collections.abc import Callable

    import falcon

    from rest.app import Handlers

log = logging.getLogger("housekeeping.server")
access_log = logging.getLogger("housekeeping.access")

#: waitress's own body limit: far above the app's 1 MiB, a last line of defence only.
WAITRESS_MAX_BODY = 16 * 1024 * 1024
#: How long in-flight requests may take to finish once the manager is terminated.
REQUEST_DRAIN_TIMEOUT = 1.0
#: Largest request line plus headers (waitress's default is 256 KiB; the API needs
#: a few hundred bytes).
MAX_HEADER_BYTES = 64 * 1024
#: Open connections at most. waitress's default of 100 lets 100 idle clients lock
#: everyone else out; each connection costs a file descriptor (see :func:`connection_limit`).
CONNECTION_LIMIT = 1000
#: Seconds a connection may sit idle, or fail to take any of its answer, before it is closed.
CHANNEL_TIMEOUT = 120


def is_loopback(host: str) -> bool:
    """Tell whether every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%", 1)[0]).is_loopback for address in addresses
    )


def connection_limit(wanted: int = CONNECTION_LIMIT) -> int:
    """Return ``wanted``, capped at half the file descriptor limit (tasks need descriptors too).

    NOTE: past the descriptor limit, accept() fails and waitress would spin on
    the ready listening socket; at its connection limit it stops accepting instead.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 2))


class JsonErrorTask(ErrorTask):
    """waitress's own error answers, in the API's form ``{"code", "message"}``.

    waitress answers by itself, without calling the app, when a request cannot
    be parsed (400), its headers are too large (431) or its body exceeds
    waitress's own limit (413); it would answer in plain text.
    """

    def execute(self) -> None:
        """Write the error as JSON and close the connection (as waitress does)."""
        error = cast(Any, self.request).error
        detail = str(error.body or "")[:200]
        message = f"{error.reason}: {detail}" if detail else str(error.reason)
        body = encode_json({"code": error.code, "message": message})
        self.status = f"{error.code} {error.reason}"
        self.response_headers = [*self.response_headers, ("Content-Type", JSON_TYPE)]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    """A waitress connection whose own error answers are JSON (:class:`JsonErrorTask`)."""

    error_task_class = JsonErrorTask


def close_stalled_channels(listener: Any, now: float) -> None:
    """waitress's maintenance, plus: close connections that take none of their answer.

    waitress closes a connection idle for ``channel_timeout`` only when no
    request runs on it. A client that stops reading (say, an event stream it
    never reads) would keep its request, and the thread running it, forever;
    it is closed once output waits and none was taken for as long. The
    request's next write then fails, which ends it and frees the thread.

    Runs in the loop thread (waitress calls maintenance from there).
    """
    type(listener).maintenance(listener, now)
    cutoff = now - listener.adj.channel_timeout
    for channel in list(listener.active_channels.values()):
        if not channel.requests:
            continue
        stalled = bool(channel.total_outbufs_len) and channel.last_activity < cutoff
        if not stalled:
            # NOTE: the whole answer may sit in the kernel's send queue (an event
            # stream's backlog fits in a few MiB of socket buffer), so waitress has
            # nothing left to write and never sees the client stall; a send queue
            # that has not moved for channel_timeout is a stall too.
            unsent = _unsent_bytes(channel)
            seen = getattr(channel, "unsent_since", None)
            if unsent and seen is not None and seen[0] == unsent:
                stalled = seen[1] < cutoff
            else:
                channel.unsent_since = (unsent, now) if unsent else None
        if stalled:
            log.info("closing a connection from %s that took no data for %d s",
                     channel.addr[0] if channel.addr else "?", listener.adj.channel_timeout)
            # NOTE: not will_close: waitress acts on that only once the socket
            # is writable, which a client that does not read never makes it.
            channel.handle_close()


def _unsent_bytes(channel: Any) -> int:
    """Bytes written to a connection's socket that the peer has not acknowledged yet."""
    try:
        raw = fcntl.ioctl(channel.socket.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except (OSError, AttributeError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])


class AccessLog:
    """Falcon middleware: one log line per request, with status and duration."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Note when the request started."""
        req.context.started = time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        """Log ``client METHOD /path?query status duration`` (the path cut to 300 characters)."""
        if not access_log.isEnabledFor(logging.INFO):
            return  # NOTE: --log-level WARNING: not even the line's fields are worked out
        elapsed = time.perf_counter() - getattr(req.context, "started", time.perf_counter())
        access_log.info(
            "%s %s %.300s %s %.1fms",
            req.remote_addr, req.method, req.relative_uri, resp.status_code, elapsed * 1000,
        )


def install_signal_handlers() -> threading.Event:
    """Make SIGTERM and SIGINT set the returned event (call from the main thread)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        log.info("%s received%s", name, "; already stopping" if stop.is_set() else "")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


class Server:
    """A waitress server for one app, run in a thread, stopped in order."""

    def __init__(
        self,
        app: falcon.App[Any, Any],
        *,
        host: str,
        port: int,
        threads: int,
        stop: threading.Event | None = None,
        channel_timeout: int = CHANNEL_TIMEOUT,
    ) -> None:
        """Create the listening socket(s) (port 0 picks a free port).

        Args:
            app: the WSGI app.
            host: the address to listen on.
            port: the port, 0 for a free one (see :attr:`urls`).
            threads: waitress request threads.
            stop: set it to shut down (see :func:`install_signal_handlers`).
            channel_timeout: seconds after which an idle connection, or one
                that takes none of its pending answer, is closed.

        Raises:
            OSError: the address cannot be listened on.
        """
        # NOTE: one listener (BaseWSGIServer) or several (MultiSocketServer, e.g. a
        # name that resolves to IPv4 and IPv6); both keep every socket in one map.
        self._server: Any = cast(Any, create_server)(
            app,
            host=host,
            port=port,
            threads=threads,
            ident="housekeeping",
            max_request_body_size=WAITRESS_MAX_BODY,
            max_request_header_size=MAX_HEADER_BYTES,
            connection_limit=connection_limit(),
            channel_timeout=channel_timeout,
            # NOTE: how often timed-out connections are looked for (default 30 s).
            cleanup_interval=max(1, min(30, channel_timeout // 4)),
            clear_untrusted_proxy_headers=True,
            asyncore_use_poll=True,
            # NOTE: keep reading while a request runs, so that a client hanging up
            # is seen (environ["waitress.client_disconnected"]); event streams use it.
            channel_request_lookahead=1,
        )
        self._map: dict[int, Any] = getattr(self._server, "map", None) or self._server._map
        self._listeners: list[Any] = [
            d for d in self._map.values() if isinstance(d, BaseWSGIServer)
        ]
        for listener in self._listeners:
            listener.channel_class = JsonErrorChannel
            listener.maintenance = lambda now, listener=listener: close_stalled_channels(
                listener, now)
        self._thread = threading.Thread(target=self._loop, name="waitress-loop", daemon=True)
        self._failed = False
        self._stop = stop or threading.Event()

    @property
    def urls(self) -> list[str]:
        """The URLs the server listens on, with the real port."""
        urls = []
        for listener in self._listeners:
            host = str(listener.effective_host)
            if ":" in host:
                host = f"[{host}]"
            urls.append(f"http://{host}:{listener.effective_port}")
        return urls

    def request_stop(self) -> None:
        """Ask :meth:`serve_until_stopped` to shut down (signal-handler safe)."""
        self._stop.set()

    def serve_until_stopped(
        self, handlers: Handlers, terminate: Callable[[], None], out: TextIO
    ) -> bool:
        """Serve until :meth:`request_stop`, then shut down in order.

        Args:
            handlers: the app's handlers (their event streams are ended).
            terminate: terminates the manager (step 3).
            out: where the URLs are printed.

        Returns:
            False if the waitress loop died on its own, True otherwise.
        """
        self._thread.start()
        for url in self.urls:
            print(f"housekeeping serving on {url}", file=out, flush=True)
        self._stop.wait()
        log.info("shutting down")
        log.debug("1. stop accepting connections")
        self._in_loop(self._close_listeners)
        log.debug("2. end event streams")
        handlers.close()
        log.debug("3. terminate the manager")
        terminate()
        log.debug("4. finish in-flight requests, close connections")
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=REQUEST_DRAIN_TIMEOUT)
        self._in_loop(lambda: wasyncore.close_all(self._map))
        self._thread.join(REQUEST_DRAIN_TIMEOUT)
        log.info("stopped")
        return not self._failed

    def _loop(self) -> None:
        try:
            self._server.run()
        except BaseException:
            if not self._stop.is_set():
                self._failed = True
                log.exception("the waitress loop died")
        finally:
            self._stop.set()

    def _in_loop(self, thunk: Callable[[], None]) -> None:
        """Run ``thunk`` in the loop thread (wasyncore is not thread-safe)."""
        if self._thread.is_alive() and self._listeners:
            self._listeners[0].trigger.pull_trigger(thunk)
        else:
            thunk()

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            # NOTE: dispatcher.close, not the server's close(): that would also
            # close the trigger that the next step needs to reach the loop.
            wasyncore.dispatcher.close(listener)
