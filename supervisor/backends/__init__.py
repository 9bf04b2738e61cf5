"""Where tasks run: one subpackage per backend, each holding both of its halves.

* :mod:`supervisor.backends.local`: a process of its own per task on this
  machine (the default);
* :mod:`supervisor.backends.dask`: the same task processes on the workers of
  a Dask cluster (its worker half, :mod:`supervisor.backends.dask.worker`,
  runs inside the Dask workers).

A backend implements :class:`supervisor.backend.Backend` and talks back only
through :class:`supervisor.backend.Host`.
"""
