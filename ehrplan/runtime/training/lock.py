"""One writer per run folder: ``RUN/.lock``, held with ``flock`` while a run trains (no torch).

The lock file holds the PID of the process that trains the folder. A second ``ehrplan train``
on the same folder (a new run or ``--resume``) is refused in one line naming that PID, exit 2.
The kernel releases a ``flock`` when its process dies, so a run killed with SIGKILL leaves no
lock that blocks anyone: the next writer takes the lock over and says whose it was (a *stale*
lock: its PID no longer runs). The file itself stays (unlinking it would let two processes lock
two different files of the same name). ``flock`` is advisory and local to a machine: on a shared
network file system across nodes it may not exclude.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ehrplan.atomic import ensure_dir, output_error
from ehrplan.errors import RunLockedError

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class RunLock:
    """``with RunLock(run_dir) as lock:`` holds the folder's lock; ``lock.stale_pid`` is the PID
    of a dead holder whose lock was taken over (None when there was none)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.stale_pid: int | None = None

    def acquire(self) -> RunLock:
        ensure_dir(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise output_error(self.path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder is not None else "another process"
            raise RunLockedError(
                f"{self.run_dir} is in use: {who} is training it (lock {self.path}); wait for "
                "it to finish or stop it, or choose another --out"
            ) from None
        previous = _read_pid(fd)
        if previous is not None and previous != os.getpid() and not _pid_alive(previous):
            self.stale_pid = previous
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # no PID: nobody holds it
        os.close(self.fd)  # closing releases the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
