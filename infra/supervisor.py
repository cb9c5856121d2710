"""A child process kept running beside the service (``ledgercore run`` keeps the direct
transport's projector in one): started again a second after it exits, stopped with the
service, and sent SIGTERM by the kernel if the service dies first, however it dies
(``PR_SET_PDEATHSIG``), so no projector outlives the process that started it."""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import threading

log = logging.getLogger("ledgercore.supervisor")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it is gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervised:
    def __init__(self, name: str, args: list[str], env: dict[str, str], restart_after: float = 1.0):
        self.name, self.args, self.env, self.restart_after = name, args, env, restart_after
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"supervise-{name}", daemon=True)

    def start(self) -> Supervised:
        self._thread.start()
        self._started.wait(10)
        return self

    def _keep(self) -> None:
        # The child's death signal is tied to this thread, which lives until ``stop``.
        while not self._stopping.is_set():
            self.process = subprocess.Popen(self.args, env=self.env, preexec_fn=_die_with_parent)
            self.starts += 1
            self._started.set()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            log.warning("%s exited with %s; starting it again in %.0f s", self.name, code,
                        self.restart_after)
            self._stopping.wait(self.restart_after)

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout)
