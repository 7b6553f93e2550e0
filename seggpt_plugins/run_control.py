"""How a run stops and how its results cross threads: the deadline and cancel of a run (`Stop`), and a
generator run in a thread of its own behind a bounded queue (`through_thread`), so that the consumer's
work overlaps the producer's.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator


class Missed(Exception):
    """A target left unfinished by the deadline or a cancel (its message says which)."""


class Stop:
    """The deadline and the cancel check of one run; remembers why it stopped."""

    def __init__(self, deadline: float | None, cancelled: Callable[[], bool] | None):
        self.deadline, self.cancelled = deadline, cancelled
        self.reason = ""
        self.closed = threading.Event()  # the consumer went away

    def __call__(self) -> bool:
        if self.reason:
            return True
        if self.closed.is_set():
            self.reason = "the run was closed"
        elif self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "not reached before the deadline"
        elif self.cancelled is not None and self.cancelled():
            self.reason = "cancelled"
        return bool(self.reason)


_END = object()  # the producer is done


def through_thread(produced: Iterator, stop: Stop, depth: int) -> Iterator:
    """Run `produced` in a thread of its own, handing its results over a bounded queue: the consumer's
    work (writing files, host app updates) overlaps the device's. Closing this generator stops the run
    at its next batch."""
    handover: queue.Queue = queue.Queue(maxsize=max(1, depth))

    def put(item) -> bool:
        while not stop.closed.is_set():
            try:
                handover.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for result in produced:
                if not put(result):
                    break
        except BaseException as exc:  # handed to the consumer
            put(("error", exc))
        finally:
            produced.close()
            put(_END)

    thread = threading.Thread(target=work, name="seggpt-runner", daemon=True)
    thread.start()
    try:
        while True:
            item = handover.get()
            if item is _END:
                return
            if isinstance(item, tuple) and item and item[0] == "error":
                raise item[1]
            yield item
    finally:
        stop.closed.set()
        thread.join()
