"""What a carclf process started goes when it dies, even by SIGKILL.

A local Ray is a tree of processes under the process that started it. Ray makes its head
processes die with their parent (``PR_SET_PDEATHSIG``) and HAProxy dies with the Ray process that
runs it (``serve/haproxy-front.sh``), but Ray's dashboard and runtime-env agents only notice
their raylet is gone after they try to tell the dead GCS, which takes them half a minute or
more. A SIGKILL runs no cleanup code in the process it kills, so the cleanup lives in another
process: :func:`watch` starts ``python -m carclf.reaper``, which keeps a list of the process's
descendants (pid and start time, so a reused pid is never taken for one) and, once the pipe it
reads from the process closes (the process exited, however it exited), gives them
``GRACE_S`` to exit on their own and then kills those still there. Only descendants are
touched: a shell or script that ran the command, and whatever else shares its process group,
are not.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import psutil

# How often the list of descendants is refreshed: a process started and orphaned within this
# long of the end can be missed.
POLL_S = 0.5
# Time the descendants get to exit by themselves once the watched process is gone.
GRACE_S = 3.0

_started: subprocess.Popen | None = None
_pipe: int | None = None  # the write end: open as long as this process lives


def watch() -> None:
    """Start the reaper for this process (once per process; Linux and macOS)."""
    global _started, _pipe
    if _started is not None and _started.poll() is None:
        return
    read, write = os.pipe()
    _started = subprocess.Popen(
        [sys.executable, "-m", "carclf.reaper", str(os.getpid())],
        stdin=read,
        close_fds=True,
        start_new_session=True,  # a Ctrl-C of the group does not stop it before its work
    )
    os.close(read)
    os.set_inheritable(write, False)  # held by this process only: it closes when this ends
    _pipe = write


def descendants(pid: int, me: int) -> dict[int, float]:
    """Pid and start time of every process under ``pid`` but ``me``."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for proc in procs:
        try:
            if proc.pid != me:
                found[proc.pid] = proc.create_time()
        except psutil.NoSuchProcess:
            continue
    return found


def still_there(known: dict[int, float]) -> list[psutil.Process]:
    """Those of ``known`` that run still (same pid, same start time), zombies aside."""
    alive = []
    for pid, created in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def reap(watched: int) -> int:
    """Follow ``watched``'s descendants until stdin closes; then end those left. How many it
    killed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, float] = {}
    while not select.select([sys.stdin], [], [], POLL_S)[0]:
        known |= descendants(watched, os.getpid())
    deadline = time.monotonic() + GRACE_S
    while (left := still_there(known)) and time.monotonic() < deadline:
        time.sleep(0.1)
    names = set()
    for proc in left:
        try:
            names.add(proc.name())
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    if left:
        ended = ", ".join(sorted(names))
        print(f"[carclf] ended what pid {watched} left running: {ended}", file=sys.stderr)
    return len(left)


if __name__ == "__main__":
    reap(int(sys.argv[1]))
