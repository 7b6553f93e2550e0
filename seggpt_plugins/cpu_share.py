"""CPU threads that leave the cores other work keeps busy: a labelling run beside other processes.

torch's parallel regions wait for their slowest thread, so a thread that shares its core with another
process slows every region: on 2 cores with one taken, 2 threads ran a forward 2.6x slower than quiet,
while one thread on the free core runs it about 1.9x slower (BENCHMARKS.md section 12). `ThreadGovernor`
reads, at most once a second, how many of this process's CPUs other processes kept busy since it last
looked (/proc/stat per CPU, less this process's own time from /proc/self/stat) and gives torch the
threads that leave those cores to them. Linux only; elsewhere (or where the files cannot be read) the
threads stay as set. Used only when the threads are automatic (loading.threads_are_auto): a number the
user set is kept.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CHECK_EVERY_S = 1.0  # how often the other processes' share is read (and the threads changed)
STALE_S = 3.0  # a reading older than this is stale: the share is read afresh over FRESH_S
FRESH_S = 0.05  # (while this process waits, so it shows what the others take when it does not compete)
TAKEN_FROM = 0.6  # a core's worth of other work from this share on counts as a core taken
PROC = Path("/proc")


class CoreShare:
    """The cores' worth of work other processes did on `cpus` since the previous call of `others()`."""

    def __init__(self, cpus, proc: Path = PROC):
        self.cpus = {f"cpu{c}" for c in cpus}
        self.proc = proc
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        """(seconds, busy seconds on our CPUs, this process's CPU seconds), or None if unreadable."""
        try:
            busy = 0
            for line in (self.proc / "stat").read_text().splitlines():
                name, *fields = line.split()
                if name in self.cpus:
                    values = [int(v) for v in fields[:8]]
                    busy += sum(values) - values[3] - values[4] - values[7]  # not idle, iowait, steal
            ours = (self.proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
            own = int(ours[11]) + int(ours[12])  # utime, stime (fields 14 and 15), all our threads
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), busy / self.tick, own / self.tick

    def others(self) -> float | None:
        """Cores' worth of other processes' work since the last call (None when unknown)."""
        now = self._sample()
        last, self.last = self.last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))


class ThreadGovernor:
    """torch's threads: `most` (the CPUs this process may use) less the cores other processes keep busy,
    at least 1; re-read at most every CHECK_EVERY_S (over the time since the last reading, or afresh over
    FRESH_S when that is older than STALE_S). Call `adjust()` before a forward pass."""

    def __init__(self, most: int, cpus=None, proc: Path = PROC):
        self.most = max(1, int(most))
        if cpus is None:
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(self.most)
        self.share = CoreShare(cpus, proc)
        self.checked = time.monotonic()
        self.threads = self.most

    def wanted(self, others: float | None) -> int:
        """The threads for `others` cores' worth of other work."""
        if others is None:
            return self.threads
        return max(1, self.most - int(others + 1 - TAKEN_FROM))

    def adjust(self) -> int:
        """Set torch's threads for the other work of the last second or more (and back, if something else
        in this process changed them); returns the count."""
        import torch

        now = time.monotonic()
        if now - self.checked >= CHECK_EVERY_S:
            if now - self.checked >= STALE_S:  # an average since long ago says little about now
                self.share.others()
                time.sleep(FRESH_S)
            self.checked = time.monotonic()
            self.threads = self.wanted(self.share.others())
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads


def thread_governor(most: int) -> ThreadGovernor | None:
    """A ThreadGovernor for this process, or None where it cannot see whose work fills its CPUs: not
    Linux, or a CPU quota smaller than the CPUs it may run on (other containers' work on those CPUs is not
    taken from its quota)."""
    if not hasattr(os, "sched_getaffinity") or not (PROC / "stat").is_file():
        return None
    cpus = os.sched_getaffinity(0)
    if len(cpus) != most:
        return None
    governor = ThreadGovernor(most, cpus)
    return governor if governor.share.last is not None else None
