"""``./scripts/run``'s process: the embedded Postgres it starts is stopped again when the
service is told to stop (SIGTERM), so nothing is left running and the data directory
can be reopened; the projector it keeps in a process of its own is started again when
it dies, goes on where it stopped, and never outlives the service."""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from api.auth import mint_token
from infra.services import EmbeddedPostgres
from tests.conftest import SECRET
from tests.harness import CliProcess, bearer, free_port


def projector_processes(process: CliProcess) -> list[psutil.Process]:
    """The live projector children of ``run`` (a killed one not yet reaped is not)."""
    assert process.process is not None
    found = []
    for child in psutil.Process(process.process.pid).children():
        try:
            if "project-log" in child.cmdline():
                found.append(child)
        except psutil.Error:
            pass
    return found


def wait_for(predicate: Any, what: str, process: CliProcess, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = predicate()
        except httpx.HTTPError:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}\n{process.output()}"
        time.sleep(0.1)


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
        [projector] = projector_processes(process)
        process.process.terminate()
        process.wait(timeout=60)
        assert not (data_dir / "pg" / "postmaster.pid").exists(), process.output()
        assert not projector.is_running() or projector.status() == psutil.STATUS_ZOMBIE
    finally:
        process.stop()
        if (data_dir / "pg" / "postmaster.pid").exists():  # never leave one running
            EmbeddedPostgres(data_dir / "pg").stop()


def test_the_projector_process_is_restarted_and_dies_with_the_service(new_database: Any) -> None:
    port = free_port()
    env = {"LEDGERCORE_PG_DSN": new_database().dsn, "LEDGERCORE_REDIS_URL": "",
           "LEDGERCORE_PORT": str(port), "LEDGERCORE_JWT_SECRET": SECRET,
           "LEDGERCORE_PROJECTOR_NICE": "5"}
    url = f"http://127.0.0.1:{port}"
    user = uuid.uuid4()
    admin = bearer(mint_token(SECRET, user_id=uuid.uuid4(), role="admin",
                              platform_roles=["platform_superadmin"]))
    own = bearer(mint_token(SECRET, user_id=user))
    process = CliProcess(["run"], env, "run-projector").start()
    try:
        wait_for(lambda: httpx.get(url + "/api/v1/healthz", timeout=1).status_code == 200,
                 "the service did not answer", process, timeout=120)

        def credit(amount: int) -> None:
            answer = httpx.post(f"{url}/api/v1/admin/users/{user}/balance", headers=admin,
                                json={"direction": "credit", "amount_minor": amount,
                                      "currency": "USD", "reason": "test"}, timeout=10)
            assert answer.status_code == 200, answer.text

        def balance() -> int:
            answer = httpx.get(url + "/api/v1/billing/balance", headers=own, timeout=10)
            return answer.json()["balance"]["amount_minor"] if answer.status_code == 200 else -1

        [first] = projector_processes(process)
        credit(500)
        wait_for(lambda: balance() == 500, "the projector process did not project", process)
        # LEDGERCORE_PROJECTOR_NICE: the projector lowers its priority before it
        # projects anything, and so does the one started again
        lowered = min(19, psutil.Process().nice() + 5)
        assert first.nice() == lowered

        first.send_signal(signal.SIGKILL)
        second = wait_for(lambda: [p for p in projector_processes(process) if p.pid != first.pid],
                          "the projector process was not started again", process, timeout=15)[0]
        credit(250)
        wait_for(lambda: balance() == 750, "the restarted projector did not go on", process)
        assert second.nice() == lowered

        assert process.process is not None
        process.process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        gone = wait_for(lambda: not second.is_running() or second.status() == psutil.STATUS_ZOMBIE,
                        "the projector outlived the service", process, timeout=15)
        assert gone
    finally:
        process.stop()
