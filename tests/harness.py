"""Services and servers for the suite: find or start Postgres, Redis and the broker;
run the API (and the Kafka transport's processes) for real on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn

from infra.services import Broker, EmbeddedPostgres, LocalRedis, free_port, postgres_answers, wait_port

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM_REDIS = "redis://127.0.0.1:6379/0"


@dataclass
class Services:
    pg_admin_dsn: str
    redis_url: str
    started: list[str] = field(default_factory=list)
    _stoppers: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for stop in reversed(self._stoppers):
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


def start_services() -> Services:
    stoppers: list[Any] = []
    started: list[str] = []
    pg_dsn = os.environ.get("LEDGERCORE_TEST_PG_ADMIN_DSN") or SYSTEM_PG
    if not postgres_answers(pg_dsn):
        data = Path(tempfile.gettempdir()) / f"ledgercore-test-pg-{os.getuid()}"
        pg = EmbeddedPostgres(data).start()
        stoppers.append(pg.stop)
        pg_dsn = pg.dsn
        started.append(f"embedded Postgres on :{pg.port}")
    else:
        started.append("Postgres on 127.0.0.1:5432 (already running)")
    redis_url = os.environ.get("LEDGERCORE_TEST_REDIS_URL") or SYSTEM_REDIS
    try:
        redis.Redis.from_url(redis_url, socket_timeout=1).ping()
        started.append("Redis on 127.0.0.1:6379 (already running)")
    except redis.RedisError:
        local = LocalRedis().start()
        stoppers.append(local.stop)
        redis_url = local.url
        started.append(f"local redis-server on :{local.port}")
    return Services(pg_dsn, redis_url, started, stoppers)


class ServerThread:
    """A real uvicorn server for an ASGI app, on a free port, in a thread."""

    def __init__(self, app: Any, port: int | None = None):
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("API server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class CliProcess:
    """``python -m infra.cli <args>`` as a child process with its own environment."""

    def __init__(self, args: list[str], env: dict[str, str], name: str):
        self.args, self.env, self.name = args, env, name
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"ledgercore-{name}-{uuid.uuid4().hex[:6]}.log"

    def start(self) -> CliProcess:
        env = {**os.environ, **self.env}
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "infra.cli", *self.args],
                                        env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "log"):
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=30)
