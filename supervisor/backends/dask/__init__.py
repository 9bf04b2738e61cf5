"""The Dask backend: tasks run on the workers of a Dask distributed cluster.

Install it with ``pip install 'housekeeping-supervisor[dask]'`` (from a clone:
``pip install '.[dask]'``); only this subpackage imports ``distributed``.
"""

from __future__ import annotations

from supervisor.backends.dask.backend import DaskBackend, local_cluster

__all__ = ["DaskBackend", "local_cluster"]
