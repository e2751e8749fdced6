"""Stop signals while a run's event loop runs (engine/pipeline/session.py installs them for the
commands; a library Session installs none).

First SIGINT/SIGTERM: the run is cancelled and ends with a partial result. Second: the shared
memory is unlinked and the process exits at once, with no report.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Optional


def _force_exit(signum: int, ring) -> None:
    """A second SIGINT/SIGTERM: unlink the shared memory and leave now. Workers die with us
    (PR_SET_PDEATHSIG, and EOF on their sockets); no report is written."""
    if ring is not None:
        ring.close()
    print(f"\n{signal.Signals(signum).name} again: exiting at once, no report", file=sys.stderr)
    sys.stderr.flush()
    os._exit(128 + signum)


class StopSignals:
    """While the event loop runs. First SIGINT/SIGTERM: `on_stop()`, then cancel the run (partial
    report). Second: exit at once. `remove()` puts back the handlers that were there before.

    The first signal arrives through the loop. The second must not: while stopping, the loop
    thread may block (joining a device thread that finishes its batch), and a loop callback would
    wait for it. So the first one swaps in a plain `signal.signal` handler, which Python runs in
    the main thread even inside a blocking join.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task, ring,
                 on_stop=None):
        self.loop, self.task, self.ring, self.on_stop = loop, task, ring, on_stop
        self.signum: Optional[int] = None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._previous:
            loop.add_signal_handler(s, self._on_signal, s)

    def _on_signal(self, signum: int) -> None:
        if self.signum is not None:
            _force_exit(signum, self.ring)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping (again to force)", file=sys.stderr)
        for s in self._previous:
            self.loop.remove_signal_handler(s)
            signal.signal(s, self._force)
        if self.on_stop is not None:
            self.on_stop()
        self.task.cancel()

    def _force(self, signum: int, frame) -> None:
        _force_exit(signum, self.ring)

    def remove(self) -> None:
        """Back to the handlers from before; once stopping, the forcing handler stays to the end."""
        for s, previous in self._previous.items():
            self.loop.remove_signal_handler(s)
            if self.signum is not None:
                signal.signal(s, self._force)
            elif previous is not None:
                signal.signal(s, previous)
