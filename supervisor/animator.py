"""The Animator base class: what a kind of task (an *operation*) implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.ops import TaskOps


class Animator:
    """Validate and execute one kind of task.

    Subclass it at module level (the child process imports it by name) and
    register an instance with :meth:`supervisor.Manager.register_animator`.
    The instance is pickled at registration and unpickled in each task process,
    so keep its attributes small and picklable.
    """

    #: Only for idempotent work: on the Dask backend, when the worker running
    #: a task dies, let Dask run the task again on another worker instead of
    #: failing it. The local backend never runs a task twice.
    rerun_on_worker_loss: bool = False

    def validate(self, create: dict[str, Any]) -> None:
        """Check the creation arguments; runs in the parent, so keep it cheap.

        Args:
            create: ``{"operation", "objectId", "serviceStates", "args"}`` as posted.

        Raises:
            InvalidArguments: the arguments are malformed (any exception is
                reported to the caller the same way).
            InvalidAnimator: this animator does not handle ``create["operation"]``.
        """

    def execute(self, ops: TaskOps) -> Any:
        """Run the task in its child process; may be ``async def``.

        Returns:
            A JSON-serializable value (at most 1 MiB encoded) that becomes
            ``task["result"]``.
        """
        raise NotImplementedError
