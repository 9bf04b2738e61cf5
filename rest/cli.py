"""The ``housekeeping`` command: ``serve`` the REST API, ``hash-token`` for token files,
``tasks`` to use a running server (:mod:`rest.client`)."""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rest.auth import AccessControl
    from supervisor.sandbox import Sandbox

log = logging.getLogger("housekeeping.server")

# Exit codes.
RET_OK = 0  # Served and shut down cleanly, or the command did its job.
RET_FAILED = 1  # The server stopped because its network loop died.
RET_USAGE = 2  # The command line is wrong (argparse uses the same code).
RET_INSECURE = 3  # Refused a non-loopback --host without --tokens (use --insecure to force).
RET_TOKENS = 4  # The --tokens file is unreadable or malformed.
RET_ANIMATORS = 5  # An --animators spec is malformed, fails to import, or its function raised.
RET_BIND = 6  # Could not listen on --host/--port.
RET_WRONG_SUPERVISOR = 7  # `import supervisor` found another package (supervisord's).
RET_DASK = 8  # --dask: distributed is not installed, or the scheduler cannot be reached.
RET_JOURNAL = 9  # --journal cannot be opened or read, or another process has it open.

_SPEC = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*)")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

SUPERVISORD_ADVICE = """\
housekeeping: `import supervisor` found {where}, which is not housekeeping's
supervisor package (supervisord, PyPI "supervisor", uses the same name).
Two distributions cannot share one top-level package in one environment.
Install supervisord separately (a system package, or its own virtualenv or
pipx), then reinstall housekeeping here: pip install --force-reinstall housekeeping
"""


class CommandError(Exception):
    """Raised to end a command with a message and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    """Run the ``housekeeping`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        An exit code, one of the ``RET_*`` constants.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "hash-token":
            return hash_token_command(args, sys.stdin, sys.stdout)
        if args.command == "tasks":  # the REST client (rest.client), issue 6
            from rest.client import run_tasks_command

            return run_tasks_command(args)
    except CommandError as exc:
        print(f"housekeeping: {exc}", file=sys.stderr)
        return exc.code
    parser.print_help(sys.stderr)
    return RET_USAGE


#: ``--max-queued`` by default: a server is bounded unless told otherwise.
DEFAULT_MAX_QUEUED = 10_000
#: ``--log-limit`` by default: bytes of output kept per task.
# NOTE: supervisor.manager.DEFAULT_LOG_LIMIT, not imported: the parser is built
# before check_supervisor_package() may say that `supervisor` is someone else's.
DEFAULT_LOG_LIMIT = 1024 * 1024
#: ``--retention`` and ``--retention-tasks`` by default (supervisor.journal's, not
#: imported for the same reason).
DEFAULT_RETENTION = 7 * 24 * 3600.0
DEFAULT_RETENTION_TASKS = 100_000


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="housekeeping", description="Run in-memory tasks in child processes, over REST."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="serve the REST API with waitress")
    add = serve_parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=_count, default=8080, help="port; 0 picks a free one (default: %(default)s)")
    add("--animators", action="append", default=[], metavar="MOD:FUNC",
        help="import MOD (the current directory is importable) and call FUNC(manager); "
             "repeatable")
    add("--tokens", metavar="FILE", help="bearer token file; without it there is no auth")
    add("--purge-delay", type=_seconds, default=60.0, metavar="S",
        help="seconds a finished task stays listed (default: %(default)s)")
    add("--max-workers", type=_positive, default=None, metavar="N",
        help="tasks running at once (default: CPU count; with --dask, the cluster's "
             "worker threads)")
    add("--max-queued", type=_count, default=DEFAULT_MAX_QUEUED, metavar="N",
        help="tasks waiting for a slot before 429 (default: %(default)s)")
    add("--cancel-grace", type=_seconds, default=5.0, metavar="S",
        help="seconds a canceled task gets before it is killed (default: %(default)s)")
    add("--log-limit", type=_positive, default=DEFAULT_LOG_LIMIT, metavar="BYTES",
        help="bytes of output (stdout, stderr) kept per task, its newest lines "
             "(default: %(default)s, 1 MiB)")
    add("--journal", metavar="PATH",
        help="record every task in this SQLite file (made if absent), so that records "
             "survive a restart: queued tasks run after it, finished ones stay fetchable")
    add("--retention", type=_positive_seconds, default=DEFAULT_RETENTION, metavar="S",
        help="with --journal: seconds a finished task's record is kept (default: "
             "%(default)s, 7 days)")
    add("--retention-tasks", type=_positive, default=DEFAULT_RETENTION_TASKS, metavar="N",
        help="with --journal: records kept at most, the oldest finished deleted first "
             "(default: %(default)s)")
    add("--threads", type=_positive, default=8, metavar="N",
        help="waitress request threads (default: %(default)s)")
    add("--max-streams", type=_positive, default=None, metavar="N",
        help="event streams open at once, each holding a thread (default: threads / 2)")
    add("--channel-timeout", type=_positive, default=120, metavar="S",
        help="close a connection idle, or taking none of its answer, for S seconds "
             "(default: %(default)s)")
    add("--log-level", default="INFO", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: %(default)s)")
    add("--insecure", action="store_true",
        help="allow a non-loopback --host without --tokens (anyone may run tasks)")
    add("--dask", metavar="ADDRESS",
        help="run tasks on the Dask cluster whose scheduler is at ADDRESS "
             "(e.g. tcp://10.0.0.5:8786); 'local' starts a LocalCluster on loopback "
             "with a single-threaded worker process per CPU. Needs housekeeping-supervisor[dask]")
    add("--dask-dashboard", metavar="HOST:PORT",
        help="with --dask local, serve Dask's dashboard (it needs bokeh) at HOST:PORT; a "
             "non-loopback HOST needs --insecure (default: none, and no port for it)")
    add("--no-demo", action="store_true", help="do not register the SLEEP and HASH demo animators")
    add("--no-private-pids", action="store_true",
        help="run tasks without a PID namespace of their own (by default each task gets "
             "one where the kernel permits it)")
    add("--private-network", action="store_true",
        help="give each task a network namespace with only loopback")
    add("--run-as", metavar="USER|dynamic", type=_user,
        help="run tasks as this user (name or uid), or 'dynamic': a uid of its own per "
             "running task (the server must run as root)")
    add("--max-processes", type=_positive, metavar="N",
        help="processes a task's user may have at once (needs --run-as)")
    add("--max-cpu-seconds", type=_positive_seconds, metavar="S",
        help="CPU seconds of a task process; over it the task FAILED")
    add("--max-open-files", type=_positive, metavar="N",
        help="file descriptors of a task process")
    add("--metrics-token", metavar="TOKEN", default=os.environ.get("HOUSEKEEPING_METRICS_TOKEN"),
        help="bearer token that /metrics requires (default: $HOUSEKEEPING_METRICS_TOKEN; "
             "without one, /metrics needs no authentication)")
    token_parser = commands.add_parser(
        "hash-token", help="print the SHA-256 digest of a token (read from stdin) for --tokens"
    )
    token_parser.add_argument("--generate", action="store_true",
                              help="make a new random token and print it with its digest")
    from rest.client import add_tasks_parser  # issue 6: the REST client

    add_tasks_parser(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Run ``housekeeping serve`` until SIGTERM/SIGINT; return an exit code."""
    logging.basicConfig(level=args.log_level, format=_LOG_FORMAT, stream=sys.stderr)
    # NOTE: waitress warns "Task queue depth" whenever requests wait for a thread,
    # which is normal under load; the access log already shows the traffic.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    check_supervisor_package()
    access_control = _access_control(args)
    registrars = load_animators(args.animators, demo=not args.no_demo)

    import falcon
    import prometheus_client

    from rest.app import RestOptions, install_error_handling, register_handlers
    from rest.server import AccessLog, Server, install_signal_handlers

    # NOTE: no "<counter>_created" series: this process's /metrics serves what
    # the README lists (Prometheus computes rates without them). An embedding
    # application keeps prometheus-client's default unless it turns them off.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    from supervisor import InvalidAnimator, JournalError, Manager
    from supervisor.linux import return_large_blocks

    stop = install_signal_handlers()
    return_large_blocks()  # NOTE: big bodies' memory goes back to the system once freed
    backend = _backend(args.dask, _dask_dashboard(args))
    try:
        # NOTE: the server is a child subreaper (the library's default is not:
        # it changes the host): a daemon that escaped both its task process
        # and the starter is re-parented here and killed.
        manager = Manager(
            purge_delay=args.purge_delay,
            max_workers=args.max_workers,
            max_queued=args.max_queued,
            cancel_grace=args.cancel_grace,
            log_limit=args.log_limit,
            subreaper=backend is None,
            backend=backend,
            sandbox=_sandbox(args),
            journal=args.journal,
            retention=args.retention,
            retention_tasks=args.retention_tasks,
        )
    except InvalidAnimator as exc:
        if backend is not None:
            backend.kill_everything()
        raise CommandError(RET_USAGE, f"sandbox: {exc}") from None
    except JournalError as exc:
        if backend is not None:
            backend.kill_everything()
        raise CommandError(RET_JOURNAL, str(exc)) from None
    except BaseException:
        if backend is not None:
            backend.kill_everything()
        raise
    try:
        for spec, register in registrars:
            try:
                register(manager)
            except Exception as exc:
                log.debug("%s raised", spec, exc_info=True)
                raise CommandError(
                    RET_ANIMATORS, f"--animators {spec}: {type(exc).__name__}: {exc}"
                ) from None
        # NOTE: no middleware at all when its lines would not be logged (Falcon's
        # path without middleware is the cheaper one for every request)
        logging_access = logging.getLogger("housekeeping.access").isEnabledFor(logging.INFO)
        app = falcon.App(middleware=[AccessLog()] if logging_access else [])
        install_error_handling(app)
        options = RestOptions(
            max_streams=args.max_streams or max(1, args.threads // 2),
            dashboard=True, metrics=True, metrics_token=args.metrics_token or None,
        )
        handlers = register_handlers(app, manager, access_control, options=options)
        try:
            server = Server(app, host=args.host, port=args.port, threads=args.threads, stop=stop,
                            channel_timeout=args.channel_timeout)
        except OSError as exc:
            raise CommandError(
                RET_BIND, f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
            ) from None
        log.info("operations: %s", ", ".join(manager.registered_operations()) or "none")
        log.info("containment: %s (%s)", manager.containment, _describe(manager.sandbox))
        if args.journal:
            log.info("journal: %s (%s)", args.journal, manager.journal_status)
        ok = server.serve_until_stopped(handlers, manager.terminate, sys.stdout)
    finally:
        manager.terminate()
    return RET_OK if ok else RET_FAILED


def _dask_dashboard(args: argparse.Namespace) -> str | None:
    """``--dask-dashboard``, checked: HOST:PORT, only with ``--dask local``, on
    loopback unless ``--insecure`` (Dask's dashboard has no authentication)."""
    address: str | None = args.dask_dashboard
    if address is None:
        return None
    if args.dask != "local":
        raise CommandError(RET_USAGE, "--dask-dashboard needs --dask local (another "
                           "cluster's scheduler serves its own dashboard)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise CommandError(RET_USAGE, f"--dask-dashboard {address}: give HOST:PORT, "
                           f"e.g. 127.0.0.1:8787")
    from rest.server import is_loopback

    if not is_loopback(host.strip("[]")) and not args.insecure:
        raise CommandError(RET_INSECURE, f"refusing to serve the Dask dashboard on "
                           f"non-loopback {host} (it has no authentication); add "
                           f"--insecure to do it anyway")
    return address


def _backend(dask: str | None, dashboard: str | None = None) -> Any:
    """The backend ``--dask`` asks for (None: the local one), with Dask's dashboard
    at ``dashboard`` (``--dask local`` only; None: none).

    Raises:
        CommandError: distributed is not installed, or the scheduler is unreachable.
    """
    if dask is None:
        return None
    try:
        from supervisor.backends.dask import DaskBackend
    except ImportError as exc:
        raise CommandError(RET_DASK, f"--dask needs the dask extra "
                           f"(pip install 'housekeeping-supervisor[dask]'): {exc}") from None
    try:
        if dask == "local":
            backend = DaskBackend.local(dashboard_address=dashboard)
        else:
            backend = DaskBackend(dask)
    except (OSError, TimeoutError, ValueError) as exc:
        raise CommandError(RET_DASK, f"--dask {dask}: cannot reach the scheduler: {exc}") from None
    log.info("tasks run on the Dask cluster at %s", backend.address)
    return backend


def check_supervisor_package() -> None:
    """Make sure ``import supervisor`` is housekeeping's package, not supervisord's.

    Raises:
        CommandError: naming what was found, with the advice to install
            supervisord separately.
    """
    try:
        import supervisor
    except ImportError as exc:
        raise CommandError(RET_WRONG_SUPERVISOR, f"cannot import supervisor: {exc}") from None
    if not getattr(supervisor, "HOUSEKEEPING", False):
        where = getattr(supervisor, "__file__", None) or "a package without __init__.py"
        raise CommandError(RET_WRONG_SUPERVISOR, SUPERVISORD_ADVICE.format(where=where).strip())


def load_animators(
    specs: list[str], *, demo: bool
) -> list[tuple[str, Callable[[Any], object]]]:
    """Import each ``module:function`` spec, demo animators first unless ``demo`` is false.

    Raises:
        CommandError: a spec is malformed, its module fails to import, or the
            function is missing.
    """
    registrars: list[tuple[str, Callable[[Any], object]]] = []
    if demo:
        from workers import demo as demo_module

        registrars.append(("workers.demo:register", demo_module.register))
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    for spec in specs:
        match = _SPEC.fullmatch(spec)
        if match is None:
            raise CommandError(
                RET_ANIMATORS, f"--animators {spec!r}: expected module.path:function"
            )
        try:
            module = importlib.import_module(match["module"])
        except Exception as exc:
            raise CommandError(
                RET_ANIMATORS,
                f"--animators {spec}: cannot import {match['module']}: "
                f"{type(exc).__name__}: {exc}",
            ) from None
        function = getattr(module, match["function"], None)
        if not callable(function):
            raise CommandError(
                RET_ANIMATORS,
                f"--animators {spec}: {match['module']} has no function {match['function']}",
            )
        registrars.append((spec, function))
    return registrars


def hash_token_command(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """Print the digest of a token read from stdin, or of a newly generated one."""
    from rest.auth import hash_token

    if args.generate:
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}\nsha256: {hash_token(token)}", file=stdout)
        return RET_OK
    token = getpass.getpass("token: ") if stdin.isatty() else stdin.readline()
    token = token.strip()
    if not token:
        raise CommandError(RET_USAGE, "hash-token: no token given on stdin")
    print(hash_token(token), file=stdout)
    return RET_OK


def _access_control(args: argparse.Namespace) -> AccessControl | None:
    """Check the bind address against --tokens/--insecure and load the token file."""
    from rest.auth import TokenAccessControl, TokenFileError
    from rest.server import is_loopback

    if not is_loopback(args.host):
        if args.tokens is None and not args.insecure:
            raise CommandError(
                RET_INSECURE,
                f"refusing to listen on non-loopback {args.host} without --tokens "
                "(anyone who can connect could run tasks); add --tokens FILE, "
                "or --insecure to do it anyway",
            )
        if args.tokens is None:
            log.warning("listening on %s WITHOUT authentication (--insecure)", args.host)
    if args.tokens is None:
        return None
    try:
        return TokenAccessControl.from_file(args.tokens)
    except TokenFileError as exc:
        raise CommandError(RET_TOKENS, str(exc)) from None


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _user(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _sandbox(args: argparse.Namespace) -> Sandbox:
    from supervisor import Sandbox

    return Sandbox(
        private_pids=False if args.no_private_pids else None,
        private_network=args.private_network,
        user=args.run_as,
        max_processes=args.max_processes,
        max_cpu_seconds=args.max_cpu_seconds,
        max_open_files=args.max_open_files,
    )


def _describe(sandbox: Sandbox) -> str:
    """The sandbox's settings that are on, for the start-up log line."""
    parts = [f"{key}={value!r}" for key, value in sandbox.to_dict().items()
             if value not in (None, False)]
    return ", ".join(parts) or "no sandbox"


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number of seconds, not negative")
    return value
