"""One error base class carrying the exit status, and the table of exit statuses every command uses.

    0   every image scored (run-eval, run-score), the cache complete (make-cache), done
    1   some images failed (listed in the report; counted, never silently skipped)
    2   bad options or paths: the message says what to change (nothing was run)
    3   the run could not go on: a worker, backend, shared-memory, cache or disk error
    4   every image counted, but a device process was lost on the way (`--devices`; its batches
        were redone on the other devices); failed images still give 1
    128 + N  stopped by signal N: 130 for SIGINT, 143 for SIGTERM (a partial report is written)

docs/usage.md has the same table. `engine.commands.main` maps an `EngineError` to its status and
prints its message as one line, `PROG: error: MESSAGE`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_IMAGES = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_DEVICE_LOST = 4


def exit_for_signal(signum: int) -> int:
    """The status of a run stopped by signal `signum` (the shell's convention)."""
    return 128 + int(signum)


class EngineError(Exception):
    """An error a command reports as one line and ends with `exit_status`."""

    exit_status = EXIT_ERROR


class UsageError(EngineError, ValueError):
    """A bad option, path or combination; nothing was run. The message says what to change."""

    exit_status = EXIT_USAGE


class RunError(EngineError, RuntimeError):
    """The run could not go on (a worker, backend, shared-memory, cache or disk error)."""

    exit_status = EXIT_ERROR
