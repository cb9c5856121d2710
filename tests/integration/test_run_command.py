"""``./scripts/run``'s process: the embedded Postgres it starts is stopped again when the
service is told to stop (SIGTERM), so nothing is left running and the data directory
can be reopened."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import httpx

from infra.services import EmbeddedPostgres
from tests.harness import CliProcess, free_port


def test_sigterm_stops_the_service_and_its_embedded_postgres() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="lc-run-"))
    os.chmod(data_dir, 0o755)
    port = free_port()
    env = {"LEDGERCORE_DATA_DIR": str(data_dir), "LEDGERCORE_PG_DSN": "", "LEDGERCORE_REDIS_URL": "",
           "LEDGERCORE_PORT": str(port)}
    process = CliProcess(["run"], env, "run-sigterm").start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.process is not None and process.process.poll() is None, process.output()
            assert time.monotonic() < deadline, process.output()
            time.sleep(0.2)
        assert (data_dir / "pg" / "postmaster.pid").exists()
        process.process.terminate()
        process.wait(timeout=60)
        assert not (data_dir / "pg" / "postmaster.pid").exists(), process.output()
    finally:
        process.stop()
        if (data_dir / "pg" / "postmaster.pid").exists():  # never leave one running
            EmbeddedPostgres(data_dir / "pg").stop()
