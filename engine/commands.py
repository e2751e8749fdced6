"""One `main()` wrapper for every command: errors become one line and an exit status.

Every `bin/` command's body raises; this wrapper maps what it raises to the statuses of the one
table in engine/errors.py (and docs/usage.md):

    EngineError (UsageError 2, RunError 3, ...)   `PROG: error: MESSAGE`, its `exit_status`
    OSError writing a report or output            `PROG: error: cannot write FILE: WHY`, 3
    KeyboardInterrupt before the run's loop       130 (the run's own stop handling covers the rest)

A command returns its own status for the outcomes that are not errors (0, 1 failed images,
4 a device lost, 128+N stopped by a signal).
"""

from __future__ import annotations

import errno
import signal
import sys
from typing import Callable, List, Optional

from engine.errors import EXIT_ERROR, EngineError, exit_for_signal


def error_line(prog: str, e: BaseException) -> str:
    """The one line a command prints for an error."""
    if isinstance(e, EngineError):
        text = str(e) or type(e).__name__
        hint = getattr(e, "hint", None)
        return f"{prog}: error: {text}" + (f"; {hint}" if hint else "")
    if isinstance(e, OSError):
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        return f"{prog}: error: cannot write {e.filename or 'the report'}: {why}"
    return f"{prog}: error: {e}"


def main(prog: str, body: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run a command's `body(argv)` and map what it raises to an exit status."""
    try:
        return body(argv)
    except EngineError as e:
        print(error_line(prog, e), file=sys.stderr)
        return e.exit_status
    except OSError as e:  # writing the report on a full or read-only disk: one line, status 3
        print(error_line(prog, e), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\n{prog}: SIGINT: stopped", file=sys.stderr)
        return exit_for_signal(signal.SIGINT)
