"""Executors: where trials run. `local` forks children on this machine."""

from tuned.executors.local import Exited, LocalExecutor, Message

__all__ = ["Exited", "LocalExecutor", "Message"]
