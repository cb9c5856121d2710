"""What one bench run owns, and gives back even when it fails: its databases, its
Redis keys, its child processes and its temporary directory. Also the helpers that
start ledgercore's processes (the ``infra.cli`` commands) and read their peak memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import redis
from psycopg.conninfo import make_conninfo
from psycopg.sql import SQL, Identifier

from infra.services import free_port
from infra.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


class BenchError(RuntimeError):
    """A step could not be carried out (a process died, a deadline passed)."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the bench dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Child:
    """A child process with its output in a log file under the run's directory."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.args, self.env = name, args, env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss: float | None = None
        self.cpu_at_stop: float | None = None

    def start(self) -> Child:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        try:
            times = psutil.Process(self.pid).cpu_times()
            return times.user + times.system
        except psutil.Error:
            return self.cpu_at_stop or 0.0

    def sample(self) -> None:
        """Remember peak memory and CPU while the process still exists."""
        if self.alive():
            self.peak_rss = peak_rss_mib(self.pid) or self.peak_rss
            self.cpu_at_stop = self.cpu_seconds()

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 15) -> None:
        if self.process is None:
            return
        self.sample()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class Server:
    child: Child
    url: str


class Run:
    """Everything one run creates, removed by ``close`` (databases unless ``keep``)."""

    def __init__(self, pg_admin_dsn: str, redis_url: str | None, keep: bool = False):
        self.pg_admin_dsn, self.redis_url, self.keep = pg_admin_dsn, redis_url, keep
        self.tag = "lcbench_" + uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix=self.tag + "-"))
        self.jwt_secret = uuid.uuid4().hex + uuid.uuid4().hex
        self.redis_prefix = self.tag
        self.databases: list[str] = []
        self.children: list[Child] = []
        self._cleanups: list[Callable[[], None]] = []
        self._counter = 0

    # ---- resources -----------------------------------------------------------------
    def database(self, purpose: str) -> str:
        name = f"{self.tag}_{purpose}"
        with psycopg.connect(self.pg_admin_dsn, autocommit=True) as conn:
            conn.execute(SQL("CREATE DATABASE {0}").format(Identifier(name)))
        self.databases.append(name)
        return make_conninfo(self.pg_admin_dsn, dbname=name)

    def on_close(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def settings(self, dsn: str, **changes: Any) -> Settings:
        """In-process settings for one of this run's databases (no environment read)."""
        return replace(Settings(), pg_dsn=dsn, jwt_secret=self.jwt_secret,
                       data_dir=self.tmp / "data", redis_prefix=self.redis_prefix, **changes)

    def env(self, **ledgercore: str) -> dict[str, str]:
        """The environment of a child: ours without any LEDGERCORE_* variable, plus
        ``ledgercore`` (keys without the prefix)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERCORE_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        env.update({f"LEDGERCORE_{k.upper()}": v for k, v in ledgercore.items()})
        return env

    def ledgercore_env(self, dsn: str, redis: bool = True, **extra: str) -> dict[str, str]:
        values = {"pg_dsn": dsn, "jwt_secret": self.jwt_secret, "data_dir": str(self.tmp / "data"),
                  "redis_prefix": self.redis_prefix, **extra}
        if redis and self.redis_url:
            values["redis_url"] = self.redis_url
        return self.env(**values)

    def child(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        self._counter += 1
        child = Child(f"{self._counter:02d}-{name}", args, env, self.tmp)
        self.children.append(child)
        return child.start()

    # ---- ledgercore processes ----------------------------------------------------------
    def start_ledgercore(self, name: str, dsn: str, redis: bool = True, **extra: str) -> Server:
        """``python -m infra.cli run --port P`` on a fresh port; waits for /healthz."""
        port = free_port()
        child = self.child(name, [PY, "-m", "infra.cli", "run", "--port", str(port)],
                           self.ledgercore_env(dsn, redis=redis, **extra))
        url = f"http://127.0.0.1:{port}"
        wait_http(child, url + "/api/v1/healthz", timeout=90)
        return Server(child, url)

    def start_cli(self, name: str, command: str, dsn: str, **extra: str) -> Child:
        return self.child(name, [PY, "-m", "infra.cli", command],
                          self.ledgercore_env(dsn, redis=False, **extra))

    def start_ceiling(self, variant: str) -> Server:
        port = free_port()
        child = self.child(f"ceiling-{variant}", [PY, "-m", "bench.ceiling_app", "--port", str(port),
                                                  "--variant", variant], self.env())
        url = f"http://127.0.0.1:{port}"
        wait_http(child, url + "/healthz", timeout=60)
        return Server(child, url)

    def run_json(self, name: str, module: str, spec: dict[str, Any], timeout: float,
                 tick: Callable[[float], None] | None = None) -> tuple[dict[str, Any], Child]:
        """Run ``python -m module SPEC RESULT`` to completion; return the result JSON."""
        self._counter += 1
        spec_path = self.tmp / f"{self._counter:02d}-{name}.spec.json"
        result_path = self.tmp / f"{self._counter:02d}-{name}.result.json"
        spec_path.write_text(json.dumps(spec))
        child = self.child(name, [PY, "-m", module, str(spec_path), str(result_path)], self.env())
        started = time.monotonic()
        while child.alive():
            elapsed = time.monotonic() - started
            if tick is not None:
                tick(elapsed)
            if elapsed > timeout:
                child.stop(timeout=5)
                raise BenchError(f"{name} did not finish within {timeout:.0f}s\n{child.tail()}")
            time.sleep(0.1)
        if child.process is not None and child.process.returncode != 0:
            raise BenchError(f"{name} failed (exit {child.process.returncode})\n{child.tail()}")
        child.stop()
        return json.loads(result_path.read_text()), child

    # ---- teardown ---------------------------------------------------------------------
    def stop_children(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop(timeout=10)
            except Exception:  # noqa: BLE001 - teardown is best effort, then goes on
                pass

    def close(self) -> list[str]:
        """Undo everything; return what could not be undone."""
        problems: list[str] = []
        self.stop_children()
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as error:  # noqa: BLE001
                problems.append(f"cleanup {cleanup}: {error}")
        if not self.keep:
            for name in self.databases:
                try:
                    with psycopg.connect(self.pg_admin_dsn, autocommit=True) as conn:
                        conn.execute(SQL("DROP DATABASE IF EXISTS {0} WITH (FORCE)")
                                     .format(Identifier(name)))
                except psycopg.Error as error:
                    problems.append(f"drop database {name}: {error}")
        if self.redis_url:
            try:
                client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
                keys = list(client.scan_iter(match=self.redis_prefix + ":*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start:start + 1000])
                client.close()
            except redis.RedisError as error:
                problems.append(f"redis keys {self.redis_prefix}:*: {error}")
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def wait_http(child: Child, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise BenchError(f"{child.name} exited before answering\n{child.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name} did not answer {url} within {timeout:.0f}s\n{child.tail()}")
        time.sleep(0.1)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> float:
    """Poll ``predicate`` until true; return the seconds it took, or raise."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started
