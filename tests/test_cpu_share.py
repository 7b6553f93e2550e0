"""cpu_share: automatic CPU threads leave the cores other processes keep busy (issue 28, item 4d)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from seggpt_plugins import cpu_share
from seggpt_plugins.cpu_share import CoreShare, ThreadGovernor


def fake_proc(tmp_path, busy: dict[int, int], ours: int):
    """A /proc with per-CPU busy ticks (user) and this process's utime."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{c} {b} 0 0 1000 0 0 0 0 0 0" for c, b in busy.items()]
    (tmp_path / "stat").write_text("\n".join(lines) + "\n")
    (tmp_path / "self").mkdir(exist_ok=True)
    fields = ["S"] + ["0"] * 10 + [str(ours), "0"] + ["0"] * 30
    (tmp_path / "self" / "stat").write_text("1234 (python (x)) " + " ".join(fields) + "\n")


def test_others_work_is_the_busy_time_of_our_cpus_less_our_own(tmp_path, monkeypatch):
    fake_proc(tmp_path, {0: 0, 1: 0, 7: 0}, ours=0)
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(cpu_share.time, "monotonic", lambda: next(clock))
    share = CoreShare([0, 1], tmp_path)
    tick = share.tick
    # in 10 s: CPUs 0 and 1 busy 10 s each, CPU 7 (not ours) too, this process 8 s of it
    fake_proc(tmp_path, {0: 10 * tick, 1: 10 * tick, 7: 10 * tick}, ours=8 * tick)
    assert share.others() == pytest.approx(1.2)


@pytest.mark.parametrize("others, threads", [(None, 4), (0.0, 4), (0.55, 4), (0.6, 3), (1.0, 3), (1.7, 2),
                                             (3.9, 1), (9.0, 1)])
def test_a_core_taken_from_six_tenths_on_and_one_thread_at_least(tmp_path, others, threads):
    fake_proc(tmp_path, {0: 0}, ours=0)
    assert ThreadGovernor(4, [0], tmp_path).wanted(others) == threads


@pytest.fixture
def clocked(tmp_path, monkeypatch):
    """(a ThreadGovernor of 2 CPUs over a fake /proc, made at time 0, the clock [now] it reads); torch's
    threads are put back afterwards."""
    import torch

    before = torch.get_num_threads()
    fake_proc(tmp_path, {0: 0, 1: 0}, ours=0)
    now = [0.0]
    monkeypatch.setattr(cpu_share.time, "monotonic", lambda: now[0])
    yield ThreadGovernor(2, [0, 1], tmp_path), now
    torch.set_num_threads(before)


def test_the_governor_sets_torch_threads_at_most_once_a_second_and_restores_them(tmp_path, clocked):
    import torch

    governor, now = clocked
    now[0] = 2.0
    fake_proc(tmp_path, {0: 2 * governor.share.tick, 1: 0}, ours=0)  # another process on one core
    assert governor.adjust() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)  # something else in the process changes them: put back
    now[0] = 2.5
    assert governor.adjust() == 1 and torch.get_num_threads() == 1
    now[0] = 4.0  # the other process has stopped
    assert governor.adjust() == 2 and torch.get_num_threads() == 2


def test_a_spinning_process_is_seen_on_this_machine():
    """Real /proc: a process spinning on a core for 1.5 s is at least 0.6 of a core of other work."""
    governor = cpu_share.thread_governor(len(__import__("os").sched_getaffinity(0)))
    if governor is None:
        pytest.skip("no /proc/stat, or a CPU quota below the CPUs this process may use")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        governor.share.others()
        time.sleep(1.5)
        assert governor.share.others() >= 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_threads_are_auto_unless_a_number_is_given(monkeypatch):
    from seggpt_plugins.loading import threads_are_auto

    for name in ("SEGGPT_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert threads_are_auto(None) and not threads_are_auto(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not threads_are_auto(None)


def test_a_stale_reading_is_taken_afresh_over_a_short_wait(tmp_path, monkeypatch, clocked):
    """Long after the last reading, the share is read over FRESH_S now, not averaged since then."""
    governor, now = clocked
    tick = governor.share.tick

    def wait(seconds):  # another process has just started and takes a whole core while we wait
        now[0] += seconds
        fake_proc(tmp_path, {0: int(round(seconds * tick)), 1: 0}, ours=0)

    now[0] = 100.0  # 100 s quiet since the last reading: averaged since then, the share would be ~0
    monkeypatch.setattr(cpu_share.time, "sleep", wait)
    assert governor.adjust() == 1
