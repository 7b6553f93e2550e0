"""The local Ray's processes end with the run, however the run ends.

A driver that starts its own Ray (`--engine ray` without a cluster) and is killed (SIGKILL, an OOM kill,
a CI timeout) leaves Ray's agents behind (DashboardAgent and RuntimeEnvAgent ignore SIGTERM), and an
actor in the middle of a batch keeps working for nobody. `Reaper` starts a small process before Ray; the
driver tells it the pids of the Ray processes it started (`follow`), it notes their descendants every
REAP_INTERVAL_S seconds and, when the driver is gone (the pipe between them closes, whatever the cause),
kills those still running. Linux only (it reads /proc); elsewhere it does nothing.

Run as `python -m seggpt_plugins.scale.reaper` with the driver's pipe as its stdin (one pid per line).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

REAP_INTERVAL_S = 0.5
PROC = "/proc"


class Reaper:
    """The process that kills the Ray processes `follow`ed once this process is gone."""

    def __init__(self):
        self.process = None
        if os.path.isdir(f"{PROC}/self/task"):
            self.process = subprocess.Popen(
                [sys.executable, "-m", "seggpt_plugins.scale.reaper"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # not in the driver's process group: a Ctrl-C spares it

    def follow(self, pids) -> None:
        """Kill these processes and their descendants when this process ends."""
        if self.process is not None:
            self.process.stdin.write("".join(f"{int(pid)}\n" for pid in pids).encode())
            self.process.stdin.flush()


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, None if it is gone."""
    try:
        with open(f"{PROC}/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (command name)"
    return int(fields[1]), int(fields[19])


def _descendants(roots: dict[int, int]) -> dict[int, int]:
    """{pid: start time} of the roots still running and all their descendants (a process seen once stays a
    root while it lives: an orphan's parent is init)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir(PROC):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(name))
                starts[int(name)] = stat[1]
    found = {pid: start for pid, start in roots.items() if starts.get(pid) == start}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and child != os.getpid():
                found[child] = starts[child]
                todo.append(child)
    return found


def reap() -> None:
    """Follow the pids read from stdin and their descendants until stdin closes, then kill those running."""
    followed: dict[int, int] = {}
    pending = b""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], REAP_INTERVAL_S)
        if ready:
            data = os.read(sys.stdin.fileno(), 4096)
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                stat = _stat(int(line))
                if stat is not None:
                    followed[int(line)] = stat[1]
        followed.update(_descendants(followed))
    time.sleep(1.0)  # a driver that exits normally has shut its Ray down by now; this catches the rest
    for pid, start in _descendants(followed).items():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reap()
