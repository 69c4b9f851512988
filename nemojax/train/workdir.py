"""One run per workdir: a lock file naming its owner, and a clear error when the workdir is unusable.

`WORKDIR/run.lock` holds {"pid", "host", "started"}. A second run on the same workdir stops at once with
the owner's pid and host; a lock left by a run that died (same host, pid gone) is taken over. Only the
first process of a multi-host run takes the lock (all hosts share the workdir).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from nemojax.checkpoint.writing import process_alive

LOCK_NAME = "run.lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used: not writable, or another run holds it."""


class WorkdirLock(contextlib.AbstractContextManager):
    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.held = False

    def acquire(self) -> "WorkdirLock":
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"--workdir {self.workdir}: cannot create it ({e.strerror})") from None
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == mine["host"] and owner.get("pid") == mine["pid"]:
                    self.held = True  # this process already holds it (a second Trainer in one process)
                    return self
                if self._stale(owner, mine["host"]):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)  # stale: its run died without releasing it
                    continue
                raise WorkdirError(
                    f"--workdir {self.workdir}: another run holds it (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, since {owner.get('started')}); wait for it, or remove {self.path} if "
                    "that run is gone") from None
            except OSError as e:
                raise WorkdirError(f"--workdir {self.workdir}: not writable ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            self.held = True
            return self
        raise WorkdirError(f"--workdir {self.workdir}: could not take {self.path}")

    def _stale(self, owner: dict, host: str) -> bool:
        """Its run died: same host and the pid is gone, or a lock left unreadable for a minute."""
        if not owner:
            try:
                return time.time() - os.path.getmtime(self.path) > 60
            except FileNotFoundError:
                return True
        return owner.get("host") == host and isinstance(owner.get("pid"), int) and not process_alive(owner["pid"])

    def _owner(self) -> dict:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as held by an unknown owner

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
