"""Files that live as long as a process (shared-memory tables, ipc sockets), and removing
those whose process is gone.

vLLM does not always shut connectors down, and a killed engine never does, so such files
outlive their process. Each one has a lock file that its process holds a shared lock on while
it lives; the kernel drops the lock when the process dies, however it dies. A process creating
its own files removes the ones whose lock nobody holds.
"""

from __future__ import annotations

import fcntl
import glob
import os
from typing import Callable, IO


def hold(lock_path: str, mode: str = "a+b") -> IO[bytes]:
    """Open ``lock_path`` (created if missing) and hold a shared lock on it for as long as the
    returned file stays open (keep it)."""
    f = open(lock_path, mode)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    except OSError:
        f.close()
        raise
    return f


def remove_unheld(pattern: str, companions: Callable[[str], list[str]] = lambda lock_path: []) -> list[str]:
    """Unlink every lock file matching ``pattern`` that no process holds, with its
    ``companions(lock_path)``; returns the lock files removed."""
    removed = []
    for lock_path in glob.glob(pattern):
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # unlinked while we hold the lock, so no process can take the files over meanwhile
            for path in (*companions(lock_path), lock_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass  # removed by someone else meanwhile
        except OSError:
            continue  # held: its process lives
        finally:
            os.close(fd)
        removed.append(lock_path)
    return removed
