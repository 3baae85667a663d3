"""What keeps a driver's run whole whatever happens to it: signals, one driver per run directory, no Ray process left
behind, and named fault points for the tests.

- **Signals.** SIGINT (Ctrl-C) and SIGTERM stop a run the same way: while the Tune experiment runs, through Tune's own
  graceful stop (it saves the experiment's state, so a resume restores it); elsewhere as a ``KeyboardInterrupt``.
  The command then exits 130 with one line saying how to resume, and shuts its embedded Ray down. A second signal
  exits at once (the watchdog below cleans up). Ray Train and Tune install SIGINT handlers of their own when they run
  in the main thread and leave them there; ``Tune`` is told not to (``TUNE_DISABLE_SIGINT_HANDLER``: its SIGUSR1
  handler is the graceful stop this module calls), and the driver's handlers are put back after every launch
  (``Signals.reassert``).
- **One driver per run directory.** ``RunLock``: an exclusive ``flock`` on ``STORAGE/.geoprune.lock`` (for remote
  storage, on a file named after the URI under ``~/.cache/geoprune/locks``: it guards against a second driver on the
  same machine only). The kernel drops it when its driver dies, however it dies, so a dead driver's lock is taken
  over without a stale-lock heuristic.
- **No orphans after kill -9.** Ray gives an embedded cluster's own processes (GCS, raylet) the kernel's
  parent-death signal, but not the processes the raylet starts (its agents, workers), which outlive a driver killed
  with SIGKILL (seen: ``ray::DashboardAgent``, ``ray::RuntimeEnvAgent`` and a worker still alive 30 s later). Every
  process of the embedded cluster inherits a token in its environment (``GEOPRUNE_DRIVER``); a small watchdog process,
  in a session of its own, notes the driver's processes while it lives and, once it has ended, kills what is left
  of them and whatever still carries the token (psutil).
- **Fault points.** ``failpoint(name)`` does nothing unless ``GEOPRUNE_FAILPOINT=name:action`` is set, where
  ``action`` is ``kill`` (SIGKILL this driver), ``sigint`` or ``sigterm`` (the signal, sent to this process as a
  user would). The kill-and-resume and signal tests use them to stop a driver at an exact point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import psutil

from ..errors import GeopruneError

log = logging.getLogger("geoprune_ray")

EXIT_INTERRUPTED = 130
TOKEN_ENV = "GEOPRUNE_DRIVER"
FAILPOINT_ENV = "GEOPRUNE_FAILPOINT"
LOCK_FILE = ".geoprune.lock"


class Signals:
    """The driver's SIGINT/SIGTERM handlers (installed by the CLI in its main thread)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.resume_hint = ""  # how to resume, for the line printed on a second signal
        self._tune_running = 0
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's graceful stop is reached through SIGUSR1 instead
        self._installed = True
        self.reassert()

    def reassert(self) -> None:
        """Put the driver's handlers back (Ray Train's ``fit`` and ``ray.init`` install their own)."""
        if self._installed and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)

    @contextlib.contextmanager
    def tune_running(self) -> Iterator[None]:
        """While a Tune experiment runs in this thread, a first signal asks Tune to stop gracefully."""
        self._tune_running += 1
        try:
            yield
        finally:
            self._tune_running -= 1
            self.reassert()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1:  # the second: now, whatever is running
            sys.stderr.write(f"geoprune: interrupted again ({name}): stopped at once{self.resume_hint}\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if self._tune_running and callable(tune_stop):
            log.warning("%s: stopping the Tune experiment (its state is saved for a resume; a second signal stops "
                        "at once)", name)
            tune_stop(signal.SIGUSR1, frame)
            return
        raise KeyboardInterrupt(name)


SIGNALS = Signals()


class RunLock:
    """An exclusive lock on a run directory for the life of this driver (see the module docstring)."""

    def __init__(self, location: str, local_root: Optional[str]) -> None:
        self.location = location
        if local_root is not None:
            self.path = Path(local_root) / LOCK_FILE
        else:
            digest = hashlib.sha256(location.encode()).hexdigest()[:24]
            self.path = Path.home() / ".cache" / "geoprune" / "locks" / f"{digest}.lock"
        self._fd: Optional[int] = None
        self._created: list[Path] = []

    def acquire(self) -> "RunLock":
        import fcntl  # POSIX only: imported here, so the fault points (imported by every Ray process) import anywhere
        self._created = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
            raise GeopruneError(f"{self.location} is in use by another geoprune driver ({who})",
                                "wait for it to finish, or stop it (Ctrl-C) and run 'geoprune resume' on the folder"
                                ) from None
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            log.info("taking over %s from a driver that is no longer running (pid %s on %s)", self.location,
                     previous.get("pid"), previous.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock. The file stays for the next driver, unless the run directory holds nothing else and this
        lock created it (a run refused before its first artifact leaves no folder behind)."""
        if self._fd is None:
            return
        if self._created and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            for folder in self._created:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
        else:
            os.ftruncate(self._fd, 0)  # released, not abandoned: the next driver has nothing to take over
        os.close(self._fd)  # drops the flock
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def mark_embedded_cluster() -> str:
    """Give this driver a token that every process of the Ray it is about to embed inherits, and start the watchdog
    that kills what still carries it once this driver has ended. Returns the token."""
    token = os.environ.get(TOKEN_ENV)
    if token and token.endswith(f":{os.getpid()}"):
        return token  # marked already (a second cluster in one process)
    token = f"{uuid.uuid4().hex}:{os.getpid()}"
    os.environ[TOKEN_ENV] = token
    if os.name == "posix":  # a session of its own: a terminal's Ctrl-C does not reach it
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        subprocess.Popen([sys.executable, "-m", "geoprune_ray.distributed.guard", str(os.getpid()), token],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, env=env, close_fds=True)
    return token


def started_at(pid: int) -> Optional[float]:
    """When process ``pid`` started (None if there is none, or it has ended: a zombie): tells a PID reused from a
    dead process."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


def descendants(root: int) -> dict[int, float]:
    """The processes under ``root`` (PID → start time)."""
    found = {}
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        with contextlib.suppress(psutil.Error):
            found[child.pid] = child.create_time()
    return found


def marked_processes(token: str) -> list[int]:
    """PIDs of the processes whose environment carries ``token`` (not this one)."""
    found = []
    for proc in psutil.process_iter(["environ"]):
        if proc.pid != os.getpid() and (proc.info.get("environ") or {}).get(TOKEN_ENV) == token:
            found.append(proc.pid)
    return found


def watch(driver_pid: int, token: str, poll_s: float = 0.5, grace_s: float = 3.0) -> int:
    """The watchdog's loop: while the driver lives, note the processes under it (the raylet's agents do not inherit
    the token: Ray starts them with an environment of their own); once it has ended, give Ray's own shutdown
    ``grace_s``, then SIGKILL every noted process still alive and every process that carries the token (three
    rounds, for what was starting). Returns how many it killed."""
    born = started_at(driver_pid)
    known: dict[int, float] = {}
    while born is not None and started_at(driver_pid) == born:
        known.update(descendants(driver_pid))
        known.pop(os.getpid(), None)  # the driver started this process too
        time.sleep(poll_s)

    def alive() -> list[int]:
        return sorted({pid for pid, start in known.items() if started_at(pid) == start} | set(marked_processes(token)))

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = 0
    for _ in range(3):
        pids = alive()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        if not pids:
            break
        time.sleep(0.5)
    return killed


def failpoint(name: str) -> None:
    """A named point where a test stops this driver: ``GEOPRUNE_FAILPOINT=name:ACTION``, ACTION one of ``kill``
    (SIGKILL), ``sigint``, ``sigterm``, or ``sigint2`` (two SIGINTs: a user pressing Ctrl-C twice)."""
    wanted = os.environ.get(FAILPOINT_ENV)
    if not wanted or wanted.rpartition(":")[0] != name:
        return
    action = wanted.rpartition(":")[2]
    log.info("fault point %s: %s", name, action)
    os.environ.pop(FAILPOINT_ENV)  # once per driver
    sigs = {"kill": [signal.SIGKILL], "sigint": [signal.SIGINT], "sigterm": [signal.SIGTERM],
            "sigint2": [signal.SIGINT, signal.SIGINT]}[action]
    for sig in sigs:
        os.kill(os.getpid(), sig)
        time.sleep(0.5)  # the handler runs in the main thread (here, if this is it) before the next signal
if __name__ == "__main__":  # the watchdog: python -m geoprune_ray.distributed.guard DRIVER_PID TOKEN
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(0 if watch(int(sys.argv[1]), sys.argv[2]) >= 0 else 1)
