"""Long subprocess jobs that run beside the in-process tests: started once at collection, read by the tests.

A job keeps everything in files under one directory (NEMOJAX_TEST_JOBS, made before any pytest-xdist worker
starts, so every worker reads the same one): NAME.json its attributes (workdir ...), NAME.out and NAME.err
its output, NAME.rc its exit code once it ends. So the process that starts the jobs (the xdist controller,
or the one pytest process) need not be the one whose test waits for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS_ENV = "NEMOJAX_TEST_JOBS"
_PROCS: list[subprocess.Popen] = []
_OWNER: list[bool] = []  # [True] in the process that made the directory, which removes it
_WATCHERS: list[threading.Thread] = []


class Job:
    """A started job, as any process sees it."""

    def __init__(self, name: str):
        self.name, self._base = name, os.path.join(directory(), name)
        with open(self._base + ".json") as f:
            self.attrs: dict = json.load(f)

    def wait(self, timeout: float = 3000) -> int:
        """The exit code, once the job has ended (TimeoutError after `timeout` seconds: jobs run slowly on a
        loaded machine, and a hung one must still end the run well inside CI's 90 minutes)."""
        deadline = time.time() + timeout
        while not os.path.exists(self._base + ".rc"):
            if time.time() > deadline:
                raise TimeoutError(f"background job {self.name} still running after {timeout} s")
            time.sleep(0.5)
        with open(self._base + ".rc") as f:
            return int(f.read())

    def output(self, tail: int = 0) -> str:
        """Its standard output, then its standard error (the last `tail` characters of each, if set)."""
        texts = []
        for suffix in (".out", ".err"):
            if os.path.exists(self._base + suffix):
                with open(self._base + suffix, errors="replace") as f:
                    texts.append(f.read()[-tail:] if tail else f.read())
        return "\n".join(texts)

    def stdout(self) -> str:
        with open(self._base + ".out") as f:
            return f.read()


def directory() -> str:
    """The jobs' directory of this test session (made by the first process that asks, inherited by the
    processes it starts, xdist's workers among them)."""
    if not os.environ.get(JOBS_ENV):
        os.environ[JOBS_ENV] = tempfile.mkdtemp(prefix="nemojax-test-jobs-")
        _OWNER.append(True)
    return os.environ[JOBS_ENV]


def workspace(name: str) -> str:
    """A fresh folder for job `name`'s files (workdirs), removed with the jobs' directory."""
    path = os.path.join(directory(), name + ".files")
    os.makedirs(path, exist_ok=True)
    return path


def launch(name: str, argv: list[str], env: dict[str, str], **attrs) -> Job:
    """Start `argv` in the repository root as job `name`; a thread of this process records its exit code.
    (All at once: capping how many run together, longest first, measured no faster on 2 cores.)"""
    base = os.path.join(directory(), name)
    with open(base + ".out", "w") as out, open(base + ".err", "w") as err:
        # Its own process group: `finish` ends the processes it starts too (train.py runs, gloo peers).
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
    _PROCS.append(proc)
    _WATCHERS.append(threading.Thread(target=_record_exit, args=(proc, base), daemon=True))
    _WATCHERS[-1].start()
    with open(base + ".json.tmp", "w") as f:
        json.dump(attrs, f)
    os.replace(base + ".json.tmp", base + ".json")
    return Job(name)


def _record_exit(proc: subprocess.Popen, base: str) -> None:
    code = proc.wait()
    with open(base + ".rc.tmp", "w") as f:
        f.write(str(code))
    os.replace(base + ".rc.tmp", base + ".rc")


def started(name: str) -> bool:
    return os.path.exists(os.path.join(directory(), name + ".json"))


def job(name: str, start) -> Job:
    """Job `name` if the session started it, else `start()` (which launches it under that name) now."""
    return Job(name) if started(name) else start()


def finish() -> None:
    """Kill the jobs this process started; the directory's owner removes it."""
    for proc in _PROCS:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # (its group may outlive it)
        except ProcessLookupError:
            pass
    for watcher in _WATCHERS:  # each records its job's exit code before the directory goes
        watcher.join(timeout=30)
    if _OWNER:
        shutil.rmtree(os.environ.pop(JOBS_ENV), ignore_errors=True)
