"""Benchmarks of housekeeping side by side with its peers, in one run.

``python -m benchmarks [--quick] [--json FILE] [--only NAME,...]`` from the
repository root (peers: ``pip install .[bench]``; ``wrk`` from the system's
packages for the REST figures). One module per benchmark, each exposing
``TITLE`` and ``run(options)``; ``common`` holds the statistics, the
alternation of approaches and the report. They are not tests and are not
collected by pytest.
"""
