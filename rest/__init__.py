"""housekeeping's REST API: a Falcon app over a ``supervisor.Manager``.

Serve it with ``housekeeping serve``, or build it yourself::

    from rest import create_app
    app = create_app(manager, access_control=None)   # any WSGI server

or mount it into an existing Falcon app with :func:`register_handlers`.

The public names are imported on first use, so that ``housekeeping`` can
still start and explain the problem when ``import supervisor`` finds
supervisord's package of the same name instead of ours.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rest.app import (
        AlreadyRegistered,
        Handlers,
        RestOptions,
        create_app,
        handlers_of,
        install_error_handling,
        register_handlers,
    )
    from rest.auth import AccessControl, TokenAccessControl, TokenFileError, TokenSubject
    from rest.errors import ApiError

_EXPORTS = {
    "AlreadyRegistered": "rest.app",
    "Handlers": "rest.app",
    "RestOptions": "rest.app",
    "create_app": "rest.app",
    "handlers_of": "rest.app",
    "install_error_handling": "rest.app",
    "register_handlers": "rest.app",
    "AccessControl": "rest.auth",
    "TokenAccessControl": "rest.auth",
    "TokenFileError": "rest.auth",
    "TokenSubject": "rest.auth",
    "ApiError": "rest.errors",
}

__all__ = [
    "AccessControl",
    "AlreadyRegistered",
    "ApiError",
    "Handlers",
    "RestOptions",
    "TokenAccessControl",
    "TokenFileError",
    "TokenSubject",
    "create_app",
    "handlers_of",
    "install_error_handling",
    "register_handlers",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rest' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
