"""An animator defined in the supervisor's main script (``__main__``).

Its task processes unpickle it from the script, imported as ``__mp_main__``.
The starter imports the script once, so that the processes it forks inherit
it; a Manager that the script's unguarded top-level code would make while it
is imported for tasks is refused (it would start a starter that imports the
script again). Each test runs a real script in a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a script may take (it runs a handful of trivial tasks).
SCRIPT_DEADLINE = 120

#: Put before every script: ``run_hello(manager, count)`` registers the script's
#: ``Hello`` (or ``maker.Hello``), runs ``count`` tasks of it, waits (bounded)
#: and prints ``{"outcomes": [[state, result], ...], "pid": <this process>}``.
RUNNER = '''
import json, os, threading


def run_hello(manager, count, animator):
    try:
        manager.register_animator("HELLO", animator)
        ids = [manager.run_task({"operation": "HELLO"}) for _ in range(count)]
        done = threading.Event()

        def ended():
            return all(manager.get_task(i)["state"] in ("SUCCEEDED", "FAILED", "CANCELED")
                       for i in ids)

        manager.subscribe(lambda event: ended() and done.set())
        done.wait(30) or ended()
        outcomes = [[manager.get_task(i)["state"], manager.get_task(i)["result"]]
                    for i in ids]
        print(json.dumps({"outcomes": outcomes, "pid": os.getpid()}))
    finally:
        manager.terminate()
'''

#: Every import of this file as ``__mp_main__`` (in the starter, or in a task
#: process) appends a line to MARKS.
COUNTING_SCRIPT = """
from supervisor import Animator, Manager

MARKS = {marks!r}
if __name__ != "__main__":
    with open(MARKS, "a") as marks:
        marks.write(f"imported in {{os.getpid()}}\\n")


class Hello(Animator):
    def execute(self, ops):
        return "hello"


if __name__ == "__main__":
    run_hello(Manager(max_workers=1), 5, Hello())
"""

#: Makes a Manager at its top level, unguarded (a mistake): imported for its
#: tasks, that Manager must be refused, not made.
UNGUARDED_SCRIPT = """
from supervisor import Animator, Manager

MARKS = {marks!r}


class Hello(Animator):
    def execute(self, ops):
        return "hello"


try:
    manager = Manager(max_workers=1)  # NOTE: no __name__ guard
except RuntimeError as exc:
    with open(MARKS, "a") as marks:
        marks.write(f"refused: {{exc}}\\n")
else:
    if __name__ != "__main__":
        with open(MARKS, "a") as marks:
            marks.write("made\\n")
        manager.terminate()

if __name__ == "__main__":
    run_hello(manager, 1, Hello())
"""

#: An animator module that makes a Manager when it is imported (a mistake in an
#: animator module): in the supervisor's process that is its business; imported
#: for tasks (the starter preloads animator modules) it must be refused.
MAKER_MODULE = """
import os
from supervisor import Animator, Manager

MARKS = {marks!r}


class Hello(Animator):
    def execute(self, ops):
        return "hello"


try:
    manager = Manager(max_workers=1)
except RuntimeError as exc:
    with open(MARKS, "a") as marks:
        marks.write(f"refused in {{os.getpid()}}: {{exc}}\\n")
else:
    with open(MARKS, "a") as marks:
        marks.write(f"made in {{os.getpid()}}\\n")
"""

MAKER_SCRIPT = """
import maker

if __name__ == "__main__":
    run_hello(maker.manager, 1, maker.Hello())
"""

#: A script whose import kills the starter (a child of the supervisor), as a
#: broken top level would; its task processes import it fine.
STARTER_KILLING_SCRIPT = """
from supervisor import Animator, Manager

MARKS = {marks!r}
if __name__ != "__main__" and str(os.getppid()) == os.environ.get("TEST_SUPERVISOR_PID"):
    with open(MARKS, "a") as marks:
        marks.write("the starter imports it, and dies\\n")
    os._exit(1)


class Hello(Animator):
    def execute(self, ops):
        return "hello"


if __name__ == "__main__":
    os.environ["TEST_SUPERVISOR_PID"] = str(os.getpid())  # NOTE: the starter inherits it
    run_hello(Manager(max_workers=1), 2, Hello())
"""


def _run(script: str, tmp_path: Path, module: str = "") -> tuple[dict[str, object], list[str]]:
    """Run :data:`RUNNER` and ``script`` (formatted with the marks file) as a main
    script, beside ``module`` as ``maker.py``; return what it printed (JSON) and the
    lines of the marks file."""
    marks = tmp_path / "marks"
    path = tmp_path / "main_script.py"
    path.write_text(RUNNER + script.format(marks=str(marks)))
    if module:
        (tmp_path / "maker.py").write_text(module.format(marks=str(marks)))
    done = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True,
        timeout=SCRIPT_DEADLINE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = marks.read_text().splitlines() if marks.exists() else []
    return json.loads(done.stdout.strip().splitlines()[-1]), lines


def test_the_main_script_is_imported_once_not_by_every_task(tmp_path: Path) -> None:
    printed, marks = _run(COUNTING_SCRIPT, tmp_path)
    assert printed["outcomes"] == [["SUCCEEDED", "hello"]] * 5
    # NOTE: once, in the starter; its forks inherit it (before: once per task)
    assert len(marks) == 1, marks


def test_a_manager_made_while_the_main_script_is_imported_for_tasks_is_refused(
        tmp_path: Path) -> None:
    printed, marks = _run(UNGUARDED_SCRIPT, tmp_path)
    assert printed["outcomes"] == [["SUCCEEDED", "hello"]]
    assert marks, "the script was never imported for a task"
    assert all(line.startswith("refused: ") for line in marks), marks
    assert "not at import time" in marks[0]


def test_a_manager_made_while_an_animator_module_is_preloaded_is_refused(
        tmp_path: Path) -> None:
    printed, marks = _run(MAKER_SCRIPT, tmp_path, MAKER_MODULE)
    assert printed["outcomes"] == [["SUCCEEDED", "hello"]]
    supervisor = printed["pid"]
    assert f"made in {supervisor}" in marks  # the supervisor's own import may make one
    others = [line for line in marks if line != f"made in {supervisor}"]
    assert others, "the module was never imported for tasks"
    assert all(line.startswith("refused in ") for line in others), marks


def test_a_main_script_that_kills_the_starter_is_imported_by_its_tasks(
        tmp_path: Path) -> None:
    """The starter dies importing it; the next one is not given it again (it would
    die the same way, again and again), and the tasks import it themselves."""
    printed, marks = _run(STARTER_KILLING_SCRIPT, tmp_path)
    assert printed["outcomes"] == [["SUCCEEDED", "hello"]] * 2
    assert len(marks) == 1, marks
