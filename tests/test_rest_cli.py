"""The ``housekeeping`` command line, in-process: every refusal happens before a manager starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rest.cli import (
    RET_ANIMATORS,
    RET_INSECURE,
    RET_TOKENS,
    RET_USAGE,
    build_parser,
    load_animators,
    main,
)
from rest.server import is_loopback


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.1", False),
    ("no-such-host.invalid", False), ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1"])
def test_public_host_without_tokens_is_refused(capsys: pytest.CaptureFixture[str],
                                               host: str) -> None:
    code, err = run(capsys, "serve", "--host", host)
    assert code == RET_INSECURE
    assert "refusing" in err and "--tokens" in err and "--insecure" in err


def test_bad_token_file_stops_the_server(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"sha256": "short", "subject": "x"}]}))
    code, err = run(capsys, "serve", "--tokens", str(path))
    assert code == RET_TOKENS and "tokens[0].sha256" in err and str(path) in err
    code, err = run(capsys, "serve", "--tokens", str(tmp_path / "missing.json"))
    assert code == RET_TOKENS and "cannot read" in err


@pytest.mark.parametrize(("spec", "words"), [
    ("nocolon", "expected module.path:function"),
    ("a.b:", "expected module.path:function"),
    ("../etc/passwd:x", "expected module.path:function"),
    ("os:system; rm", "expected module.path:function"),
    ("no_such_module_here:register", "cannot import no_such_module_here: ModuleNotFoundError"),
    ("json:no_such_function", "json has no function no_such_function"),
    ("json:__doc__", "json has no function __doc__"),
])
def test_bad_animator_specs_are_named(capsys: pytest.CaptureFixture[str], spec: str,
                                      words: str) -> None:
    code, err = run(capsys, "serve", "--no-demo", "--animators", spec)
    assert code == RET_ANIMATORS and words in err


def test_failing_import_is_reported_with_its_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "explodes_on_import.py").write_text("raise ValueError('bad config')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    code, err = run(capsys, "serve", "--animators", "explodes_on_import:register")
    assert code == RET_ANIMATORS and "ValueError: bad config" in err


def test_demo_animators_come_first_unless_no_demo() -> None:
    specs = [spec for spec, _ in load_animators(["json:dumps"], demo=True)]
    assert specs == ["workers.demo:register", "json:dumps"]
    assert [spec for spec, _ in load_animators([], demo=False)] == []


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys)
    assert code == RET_USAGE and "serve" in err and "hash-token" in err


@pytest.mark.parametrize("argv", [["serve", "--port", "-1"], ["serve", "--threads", "0"],
                                  ["serve", "--cancel-grace", "-1"],
                                  ["serve", "--purge-delay", "nan"],
                                  ["serve", "--log-level", "loud"]])
def test_bad_numbers_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == RET_USAGE


def test_every_flag_of_the_spec_exists() -> None:
    args = build_parser().parse_args([
        "serve", "--host", "127.0.0.1", "--port", "8080", "--animators", "a:b",
        "--tokens", "t.json", "--purge-delay", "1.5", "--max-workers", "2", "--max-queued", "3",
        "--cancel-grace", "2", "--threads", "4", "--log-level", "debug", "--insecure",
        "--no-demo"])
    assert (args.host, args.port, args.animators, args.tokens) == ("127.0.0.1", 8080,
                                                                   ["a:b"], "t.json")
    assert (args.purge_delay, args.max_workers, args.max_queued, args.cancel_grace,
            args.threads, args.log_level, args.insecure, args.no_demo) == (
        1.5, 2, 3, 2.0, 4, "DEBUG", True, True)
