"""``python -m rest``: the same as the ``housekeeping`` command."""

from __future__ import annotations

import sys

from rest.cli import main

if __name__ == "__main__":
    sys.exit(main())
