"""The pytest plugin (entry point ``pytest11: ledgercore``): fixtures that give a test
a running ledgercore.

- ``ledgercore``: a ``RunningLedgercore`` (session-scoped, one per mode). The mode is
  ``--ledgercore-mode`` on the command line, else ``LEDGERCORE_KIT_MODE``, else the
  ini option ``ledgercore_mode``, else ``memory``: ``memory`` (in process, in-memory
  persistence), ``service`` (the real API on Postgres over HTTP) or ``both`` (every
  test that uses the fixture runs once per mode).
- ``ledgercore_client``: an HTTP client of the served ledgercore with ``token(...)``
  for any user, tenant, project and role, ``admin_token()`` and ``node_token(...)``.
  HTTP needs the real service, so a test using it always runs in ``service`` mode.

Everything heavy is imported when a fixture is first used, so the plugin costs nothing
to suites that do not use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

MODES = ("memory", "service")


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("ledgercore", "ledgercore testing kit")
    group.addoption("--ledgercore-mode", choices=(*MODES, "both"), default=None,
                    help="run the ledgercore fixture in process (memory), against the real "
                         "service (service), or both; default: $LEDGERCORE_KIT_MODE, the "
                         "ledgercore_mode ini option, else memory")
    parser.addini("ledgercore_mode", "default mode of the ledgercore fixture", default="memory")


def modes(config: Any) -> list[str]:
    chosen = (config.getoption("--ledgercore-mode") or os.environ.get("LEDGERCORE_KIT_MODE")
              or config.getini("ledgercore_mode") or "memory")
    if chosen not in (*MODES, "both"):
        raise pytest.UsageError(f"ledgercore mode must be memory, service or both, not {chosen!r}")
    return list(MODES) if chosen == "both" else [chosen]


def pytest_generate_tests(metafunc: Any) -> None:
    if "ledgercore" not in metafunc.fixturenames:
        return
    chosen = modes(metafunc.config)
    if "ledgercore_client" in metafunc.fixturenames:
        chosen = ["service"]
    metafunc.parametrize("ledgercore", chosen, indirect=True, scope="session")


@pytest.fixture(scope="session")
def ledgercore(request: Any) -> Iterator[Any]:
    """A running ledgercore in the mode this test is parametrized with."""
    from ledgercore_testing.running import InProcessLedgercore, ServedLedgercore

    mode = getattr(request, "param", None) or modes(request.config)[0]
    running = InProcessLedgercore() if mode == "memory" else ServedLedgercore()
    yield running
    running.close()


class LedgercoreClient:
    """HTTP client of the served ledgercore under test."""

    def __init__(self, served: Any) -> None:
        self.served = served
        self.http = served.http
        self.tokens = served.tokens
        self.base_url = served.url

    def token(self, user_id: Any = None, *, tenant_id: Any = None, project_id: Any = None,
              role: str = "user", tenant_role: str | None = None,
              project_role: str | None = None, **claims: Any) -> str:
        """A bearer token for any caller (a fresh user id when none is given), in the
        tenant and project roles given (``member`` of both when none is)."""
        import uuid

        return self.tokens.user(user_id or uuid.uuid4(), tenant_id=tenant_id,
                                project_id=project_id, role=role, tenant_role=tenant_role,
                                project_role=project_role, **claims)

    def admin_token(self) -> str:
        return self.tokens.admin()

    def node_token(self, node_id: Any) -> str:
        return self.tokens.node(node_id)

    def request(self, method: str, path: str, *, token: str | None = None,
                json: Any = None, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        merged = dict(headers or {})
        if token is not None:
            merged["Authorization"] = f"Bearer {token}"
        return self.http.request(method, path, json=json, headers=merged, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)


@pytest.fixture(scope="session")
def ledgercore_client(ledgercore: Any) -> LedgercoreClient:
    assert ledgercore.mode == "service"
    return LedgercoreClient(ledgercore)
