"""Several server processes on one port: what ``python -m serveready.kserve --workers N`` runs.

KServe's own multi-process mode starts its workers with ``spawn`` and re-imports its app there, without
the models or this library's routes; so the parent here does what TorchServe's frontend does for its
workers, with whole servers: it binds the HTTP socket once, starts N copies of the server that all
``accept`` on that one socket (the kernel hands each connection to an idle one; gRPC shares its port
with ``SO_REUSEPORT``, gRPC's default on Linux), restarts a copy that dies, and stops them all on SIGTERM.

Why processes and not threads: a small model's time is Python's (decoding, encoding), which one
interpreter runs one at a time; N processes use N cores. Each process holds every model of the store.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

logger = logging.getLogger("serveready.workers")

RESTART_PAUSE_S = 1.0  # a copy that dies at start is not restarted in a tight loop
STOP_GRACE_S = 30.0
EARLY_EXIT_S = 30.0  # a copy that exits this soon after its start failed to start...
EARLY_EXITS = 3      # ...and this many such failures in a row stop the supervisor (a broken store, a port in use)


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The HTTP socket every copy accepts on, inheritable so a child can be handed its descriptor."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the supervisor dies, even by SIGKILL, so no copy outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """N children from ``command(fd)``, each handed the listening socket's descriptor; restarted when they exit."""

    def __init__(self, command: Callable[[int], Sequence[str]], sock: socket.socket, count: int) -> None:
        self.command, self.sock, self.count = command, sock, count
        self.children: list[subprocess.Popen | None] = [None] * count
        self.started: list[float] = [0.0] * count
        self.early_exits = 0
        self.stopping = False

    def _start(self, slot: int) -> None:
        fd = self.sock.fileno()
        child = subprocess.Popen(list(self.command(fd)), pass_fds=(fd,), preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.children[slot], self.started[slot] = child, time.monotonic()
        logger.info("worker %d: process %d", slot, child.pid)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Start the children, keep them alive until SIGTERM/SIGINT, then stop them (SIGTERM, then SIGKILL). Returns 0,
        or 1 when copies kept failing at start (then nothing would ever answer: better a visible exit)."""
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in range(self.count):
                self._start(slot)
            while not self.stopping:
                time.sleep(0.2)
                for slot, child in enumerate(self.children):
                    if child is None or child.poll() is None or self.stopping:
                        continue
                    early = time.monotonic() - self.started[slot] < EARLY_EXIT_S
                    self.early_exits = self.early_exits + 1 if early else 0
                    if self.early_exits >= EARLY_EXITS:
                        logger.error("worker %d: process %d exited with %s, the %d. failure at start in a row: stopping", slot, child.pid,
                                     child.returncode, self.early_exits)
                        return 1
                    logger.warning("worker %d: process %d exited with %s; starting another", slot, child.pid, child.returncode)
                    time.sleep(RESTART_PAUSE_S)
                    self._start(slot)
        finally:
            self._stop_children()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def _stop_children(self) -> None:
        alive = [c for c in self.children if c is not None and c.poll() is None]
        for child in alive:
            child.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in alive:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.sock.close()


def supervise(command: Callable[[int], Sequence[str]], host: str, port: int, count: int) -> int:
    """Bind ``host:port`` and run ``count`` copies of ``command(fd)`` on it until stopped."""
    try:
        sock = listening_socket(host, port)
    except OSError as err:
        print(f"serveready: error: cannot listen on {host}:{port}: {err.strerror}", file=sys.stderr)
        return 1
    logger.info("%d server processes on http://%s:%d (supervisor %d)", count, host, port, os.getpid())
    return Supervisor(command, sock, count).run()


__all__ = ["Supervisor", "listening_socket", "supervise"]
