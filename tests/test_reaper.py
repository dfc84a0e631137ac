"""carclf.reaper: what a process started goes when it is SIGKILLed; nothing else is touched."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from carclf import reaper

# Starts the reaper, then a child that ignores its parent's death (its own session, as Ray's
# agents are in effect), prints that child's pid and waits to be killed.
PARENT = """
import subprocess, sys, time
from carclf.reaper import watch
watch()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_sigkilled_process_leaves_nothing_it_started(tmp_path: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(3 * reaper.POLL_S)  # the reaper has seen it
        parent.kill()  # no cleanup code runs in the parent
        parent.wait(timeout=10)
        child.wait(timeout=reaper.GRACE_S + 5)  # psutil.TimeoutExpired: it outlived its parent
        assert bystander.poll() is None  # not a descendant: left alone
    finally:
        bystander.kill()
        parent.kill()
        if child is not None and child.is_running():
            child.kill()


def test_a_reused_pid_is_not_taken_for_a_descendant() -> None:
    me = psutil.Process()
    assert reaper.still_there({me.pid: me.create_time()}) == [me]
    assert reaper.still_there({me.pid: me.create_time() - 100.0}) == []
