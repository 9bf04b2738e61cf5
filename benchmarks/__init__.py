"""Benchmarks of housekeeping against the standard library, run side by side.

Run one with ``python -m benchmarks.<name>`` from the repository root; they are
not tests and are not collected by pytest.
"""
