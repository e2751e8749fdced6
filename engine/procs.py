"""Process and core look-ups shared by the ring, the part writer, the backends, autotuning, the
benchmarks and the tests."""

from __future__ import annotations

import os
from typing import Dict


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (a zombie counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def running(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as gone (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def worker_processes() -> Dict[int, int]:
    """{worker pid: the parent pid named in its --parent argument} of every decode worker (Linux)."""
    found: Dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"preprocess.worker" in argv and b"--parent" in argv:
            try:
                found[int(entry)] = int(argv[argv.index(b"--parent") + 1])
            except (IndexError, ValueError):
                continue
    return found
