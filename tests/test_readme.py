"""The README's embedding example runs as written and prints what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _embedding_example() -> tuple[str, str]:
    """The first python block under "## Embedding", and the line it says it prints."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Embedding", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    printed = re.search(r"It prints\n`(.*?)`", section, re.S)
    assert code and printed, "the README lost its embedding example"
    return code.group(1), printed.group(1)


def test_embedding_example_runs_as_written(tmp_path: Path) -> None:
    code, printed = _embedding_example()
    script = tmp_path / "embed.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == printed.replace("\n", " ")
