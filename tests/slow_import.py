"""An animator module that takes seconds to import, as a big library does.

Importing it sleeps ``SLOW_IMPORT_SECONDS`` (in every process that imports it:
the test and the starter, which preloads it when its animator is registered).
"""

from __future__ import annotations

import time
from typing import Any

from supervisor import Animator

SLOW_IMPORT_SECONDS = 3.0

time.sleep(SLOW_IMPORT_SECONDS)


class Imported(Animator):
    """Return at once: what matters is the import."""

    def execute(self, ops: Any) -> Any:
        return "imported"
