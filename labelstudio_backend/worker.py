"""The gunicorn worker: gthread, with /health served by its own threads, and a log line when it drains.

Label Studio polls `/health`; under load every request thread of a plain gthread worker may be busy with
`/predict` (downloads, waiting for the model), and a health check queued behind them times out. Here a
request whose first bytes are `GET /health` (or `GET / `) goes to two threads of its own, so it answers
in milliseconds whatever the load. The path is read with MSG_PEEK: nothing is consumed, gunicorn parses
the request as usual. Imports gunicorn only (the master loads this class; torch stays out of it).
"""

from __future__ import annotations

import selectors
import socket
import time
from concurrent import futures
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

HEALTH_PREFIXES = (b"GET /health ", b"GET /health?", b"GET / ", b"HEAD /health ")
HEALTH_THREADS = 2


class HealthFirstWorker(ThreadWorker):
    def init_process(self):
        self.health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="health")
        super().init_process()

    def _peek(self, conn) -> bytes | None:
        """The request's first bytes without consuming them; None when none have arrived yet."""
        try:
            return conn.sock.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""  # a broken connection: the normal path closes it

    def enqueue_req(self, conn):
        buffered = conn.parser is not None and conn.parser.unreader.buf.getvalue()
        head = None if buffered else self._peek(conn)
        if head is None and not buffered and not conn.initialized and not conn.data_ready:
            # nothing to read yet: wait on the poller (as gunicorn does for slow clients), not in a thread
            conn.sock.setblocking(False)
            conn.timeout = time.monotonic() + max(self.cfg.keepalive, 5)
            self.pending_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))
            return
        pool = self.health_pool if head and head.startswith(HEALTH_PREFIXES) else self.tpool
        fs = pool.submit(self.handle, conn)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def handle_exit(self, sig, frame):
        if self.alive:  # logged from the main loop, not inside the signal handler
            self.method_queue.defer(self._log_draining)
        super().handle_exit(sig, frame)

    def _log_draining(self):
        self.log.info("worker %s: stopping; draining %d open connection(s) for up to %s s (graceful timeout)",
                      self.pid, self.nr_conns, self.cfg.graceful_timeout)

    def run(self):
        try:
            super().run()
        finally:
            self.health_pool.shutdown(wait=False)
            self.log.info("worker %s: stopped (%d connection(s) still open)", self.pid, self.nr_conns)
