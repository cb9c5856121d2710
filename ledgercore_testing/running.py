"""A running ledgercore for a user's test suite, in one of two modes with one interface:

- ``InProcessLedgercore`` (mode ``memory``): the domain application
  (``domain.app.Ledgercore``) on the eventsourcing library's in-memory (POPO)
  persistence, driven by the same command handlers the API calls. No services, no
  HTTP: milliseconds per command.
- ``ServedLedgercore`` (mode ``service``): the real API over HTTP, on a real Postgres
  (and Redis when one answers): either started here (a fresh database, a uvicorn
  server on a free port in this process, dropped afterwards) or, with
  ``LEDGERCORE_KIT_URL``, one already running elsewhere (your compose stack, with its
  Kafka transport), configured by the service's own ``LEDGERCORE_*`` variables.

Both answer each command as a short outcome string (``"ok"`` or the refusal's
``details.reason``/``code``, the same words in both modes) and read the live state the
kit's invariants check from the event store itself (``observe``), never a read model.

May import: ``domain``, ``api``, ``infra`` (this is the service's edge).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from domain.app import Ledgercore
from domain.canonical import canonical_json
from domain.errors import DomainError, IdempotencyKeyReused
from domain.testing import billing, payments
from domain.testing.system import ReferenceSystem

KIT_URL = "LEDGERCORE_KIT_URL"
PG_ADMIN = ("LEDGERCORE_KIT_PG_ADMIN_DSN", "LEDGERCORE_TEST_PG_ADMIN_DSN")
REDIS = ("LEDGERCORE_KIT_REDIS_URL", "LEDGERCORE_TEST_REDIS_URL")
SYSTEM_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM_REDIS = "redis://127.0.0.1:6379/0"


def outcome(code: str, details: dict[str, Any] | None) -> str:
    """One word for an answer, the same from the domain and from HTTP."""
    reason = (details or {}).get("reason")
    if reason == "idempotency_key_reused":
        return "key_reused"
    if reason == "balance_out_of_range":
        return "out_of_range"
    return reason or code


def _render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"refused": outcome(result.code, result.details)}
    return {"ok": result}


class RunningLedgercore:
    """What both modes offer. ``app`` is a ``Ledgercore`` reading the event store of
    the ledgercore under test (for ``observe``)."""

    mode: str
    app: Ledgercore
    admin_id: UUID

    # ---- commands (each answers "ok" or the refusal) -----------------------------------
    def adjust_balance(self, user: UUID, direction: str, amount_minor: int, currency: str,
                       reason: str = "test", key: str | None = None) -> str:
        raise NotImplementedError

    def start_payment(self, user: UUID, tenant: UUID, amount_minor: int, currency: str) -> str:
        """A checkout for ``user``: answers the payment session id."""
        raise NotImplementedError

    def deliver_webhook(self, event: dict[str, Any]) -> str:
        """The provider's signed webhook with this body (``strategies.checkout_event``)."""
        raise NotImplementedError

    def reconcile(self, session_id: str, action: str, amount_minor: int | None = None) -> str:
        raise NotImplementedError

    # ---- observation ---------------------------------------------------------------------
    def observe(self, model: ReferenceSystem, users: list[UUID]) -> dict[str, Any]:
        """The live state ``domain.testing.system.check_invariants`` compares."""
        self.settle()
        return {"billing": billing.observe(self.app, users),
                "payments": payments.observe(self.app, model.payments, users)}

    def settle(self) -> None:
        """Wait until what was sent is readable (nothing to wait for in process)."""

    def close(self) -> None:
        self.app.close()


class InProcessLedgercore(RunningLedgercore):
    mode = "memory"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo", **(env or {})})
        self.admin_id = uuid.uuid4()

    def _ctx(self, source: str, claim: Any = None) -> Any:
        from domain.provenance import CommandContext

        return CommandContext(actor_id=str(self.admin_id), actor_role="admin", source=source,
                              idempotency=claim)

    def _run(self, command: Any) -> str:
        try:
            response = self.app.execute(command).response
        except IdempotencyKeyReused:
            return "key_reused"
        return response.get("refused", "ok")

    def adjust_balance(self, user: UUID, direction: str, amount_minor: int, currency: str,
                       reason: str = "test", key: str | None = None) -> str:
        from domain.billing import adjust_balance
        from domain.money import Money
        from domain.provenance import IdempotencyClaim

        body = {"direction": direction, "amount_minor": amount_minor, "currency": currency,
                "reason": reason}
        claim = None
        if key is not None:  # as the API claims it: caller and operation; body and path
            claim = IdempotencyClaim(
                f"user:{self.admin_id}:adminAdjustBalance:{key}",
                hashlib.sha256(canonical_json({"body": body, "path": {"user_id": str(user)},
                                               "project": None})).hexdigest())
        return self._run(adjust_balance(self._ctx("admin", claim), user_id=user,
                                        direction=direction, amount=Money(amount_minor, currency),
                                        reason=reason, render=_render))

    def start_payment(self, user: UUID, tenant: UUID, amount_minor: int, currency: str) -> str:
        from domain.money import Money
        from domain.payments import create_charge_session

        session_id = uuid.uuid4()
        answer = self.app.execute(create_charge_session(
            self._ctx("api"), session_id=session_id, org_id=tenant, user_id=user,
            provider_session_id=f"cs_{session_id.hex}", url="https://checkout.invalid/pay",
            amount=Money(amount_minor, currency), render=_render)).response
        assert "ok" in answer, answer
        return str(session_id)

    def deliver_webhook(self, event: dict[str, Any]) -> str:
        from domain.disputes import dispute_update, parse_provider_dispute
        from domain.payments import checkout_event, provider_amount, provider_event

        raw = json.dumps(event).encode()
        digest = hashlib.sha256(raw).hexdigest()
        ctx = self._ctx("webhook")
        obj = event["data"]["object"]
        try:
            if event["type"].startswith("charge.dispute."):
                return self._run(provider_event(
                    ctx, provider_event_id=event["id"], event_type=event["type"],
                    payload_sha256=digest, apply=dispute_update(event["id"],
                                                               parse_provider_dispute(obj)),
                    render=_render))
            amount = None
            if event["type"] == "checkout.session.completed":
                amount = provider_amount(obj.get("amount_total"), obj.get("currency"))
        except DomainError as error:
            return outcome(error.code, error.details)
        session = obj.get("metadata", {}).get("payment_session_id") or obj.get("client_reference_id")
        return self._run(checkout_event(
            ctx, provider_event_id=event["id"], event_type=event["type"], payload_sha256=digest,
            payment_session_id=UUID(session), amount=amount,
            payment_intent_id=obj.get("payment_intent"), render=_render))

    def reconcile(self, session_id: str, action: str, amount_minor: int | None = None) -> str:
        from domain.payments import reconcile_payment_session

        return self._run(reconcile_payment_session(
            self._ctx("admin"), payment_session_id=UUID(session_id), action=action,
            amount_minor=amount_minor, reason="operator", failure_reason=None, render=_render))


# ---- the real service -------------------------------------------------------------------------


@dataclass
class Tokens:
    """Bearer tokens for any caller of the ledgercore under test."""

    secret: str
    admin_id: UUID = field(default_factory=uuid.uuid4)

    def admin(self) -> str:
        from api.auth import mint_token

        return mint_token(self.secret, user_id=self.admin_id, role="admin",
                          platform_roles=["platform_superadmin"])

    def user(self, user_id: UUID | str, *, tenant_id: UUID | str | None = None,
             project_id: UUID | str | None = None, role: str = "user",
             tenant_role: str | None = None, project_role: str | None = None,
             **claims: Any) -> str:
        """A user's token; ``project_id`` also becomes its only member project.

        ``tenant_role`` (``owner``|``admin``|``member``|``billing_viewer``) and
        ``project_role`` (``owner``|``admin``|``member``|``viewer``, in ``project_id``)
        are left out when not given: the caller is then ``member`` of both. Other
        projects' roles go in ``project_roles={project: role}``."""
        from api.auth import mint_token

        if project_id is not None:
            claims.setdefault("project_ids", [str(project_id)])
            claims.setdefault("project_id", str(project_id))
            if project_role is not None:
                claims["project_roles"] = {**claims.get("project_roles", {}),
                                           str(project_id): project_role}
        elif project_role is not None:
            raise ValueError("project_role needs the project_id it applies to")
        return mint_token(self.secret, user_id=user_id, tenant_id=tenant_id, role=role,
                          tenant_role=tenant_role, **claims)

    def node(self, node_id: UUID | str) -> str:
        """A node agent's token (that node only)."""
        from api.auth import mint_token

        return mint_token(self.secret, user_id=node_id, actor_type="node")

    def headers(self, token: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", **extra}


class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        from infra.services import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the ledgercore API did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def find_services() -> tuple[str, str | None, list[Any]]:
    """(Postgres admin DSN, Redis URL or None, stoppers): the configured ones, else
    the ones on 127.0.0.1 if they answer, else an embedded Postgres (and no Redis:
    the cache answers ``bypass``)."""
    import redis

    from infra.services import EmbeddedPostgres, postgres_answers

    stoppers: list[Any] = []
    pg = next((os.environ[n] for n in PG_ADMIN if os.environ.get(n)), SYSTEM_PG)
    if not postgres_answers(pg):
        data = Path(tempfile.gettempdir()) / f"ledgercore-kit-pg-{os.getuid()}"
        embedded = EmbeddedPostgres(data).start()
        stoppers.append(embedded.stop)
        pg = embedded.dsn
    url: str | None = next((os.environ[n] for n in REDIS if os.environ.get(n)), SYSTEM_REDIS)
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError:
        url = None
    return pg, url, stoppers


class ServedLedgercore(RunningLedgercore):
    mode = "service"

    def __init__(self) -> None:
        from infra.settings import Settings

        self._stoppers: list[Any] = []
        self.position = 0
        url = os.environ.get(KIT_URL)
        if url:  # someone else's running ledgercore: its own configuration
            self.settings = Settings.from_env()
            self.url = url.rstrip("/")
            self.app = Ledgercore(env=self.settings.eventstore_env())
            self._stoppers.append(self.app.close)
        else:
            self._start_own(Settings)
        self.tokens = Tokens(self.settings.jwt_secret)
        self.admin_id = self.tokens.admin_id
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self._stoppers.insert(0, self.http.close)

    def _start_own(self, settings_type: Any) -> None:
        from api.app import create_app
        from infra.db import Stores, create_database, drop_database

        admin_dsn, redis_url, stoppers = find_services()
        self._stoppers += stoppers
        name = f"lc_kit_{uuid.uuid4().hex[:10]}"
        dsn = create_database(admin_dsn, name)
        self._stoppers.insert(0, lambda: drop_database(admin_dsn, name))
        self.settings = replace(
            settings_type(), pg_dsn=dsn, redis_url=redis_url, jwt_secret=secrets.token_hex(32),
            webhook_secret="whsec_" + secrets.token_hex(16), redis_prefix=f"lc-kit-{name}",
            read_wait_seconds=10, node_wait_seconds=1)
        stores = Stores.open(self.settings)
        self._stoppers.insert(0, stores.close)
        server = _Server(create_app(self.settings, stores))
        self._stoppers.insert(0, server.stop)
        self.url = f"http://127.0.0.1:{server.port}"
        self.app = stores.app

    # ---- HTTP ---------------------------------------------------------------------------
    def request(self, method: str, path: str, token: str, body: Any = None,
                **headers: str) -> httpx.Response:
        response = self.http.request(method, path, json=body,
                                     headers=self.tokens.headers(token, **headers))
        position = response.headers.get("X-Ledger-Position")
        if position:
            self.position = max(self.position, int(position))
        return response

    @staticmethod
    def _answer(response: httpx.Response) -> str:
        if response.status_code < 300:
            return "ok"
        body = response.json()
        assert response.status_code < 500, f"{response.status_code}: {body}"
        return outcome(body["code"], body.get("details"))

    def adjust_balance(self, user: UUID, direction: str, amount_minor: int, currency: str,
                       reason: str = "test", key: str | None = None) -> str:
        headers = {"Idempotency-Key": key} if key is not None else {}
        return self._answer(self.request(
            "POST", f"/api/v1/admin/users/{user}/balance", self.tokens.admin(),
            {"direction": direction, "amount_minor": amount_minor, "currency": currency,
             "reason": reason}, **headers))

    def start_payment(self, user: UUID, tenant: UUID, amount_minor: int, currency: str) -> str:
        response = self.request("POST", "/api/v1/payments/checkout-session",
                                self.tokens.user(user, tenant_id=tenant),
                                {"amount_minor": amount_minor, "currency": currency})
        assert response.status_code == 200, response.text
        return response.json()["payment_session_id"]

    def deliver_webhook(self, event: dict[str, Any]) -> str:
        from api import webhooks

        raw = json.dumps(event).encode()
        response = self.http.post("/api/v1/payments/webhook", content=raw, headers={
            "Content-Type": "application/json",
            webhooks.HEADER: webhooks.sign(self.settings.webhook_secret, raw)})
        position = response.headers.get("X-Ledger-Position")
        if position:
            self.position = max(self.position, int(position))
        return self._answer(response)

    def reconcile(self, session_id: str, action: str, amount_minor: int | None = None) -> str:
        body: dict[str, Any] = {"action": action, "reason": "operator"}
        if amount_minor is not None:
            body["amount_minor"] = amount_minor
        return self._answer(self.request(
            "POST", f"/api/v1/admin/payments/sessions/{session_id}/reconcile",
            self.tokens.admin(), body))

    def close(self) -> None:
        for stop in self._stoppers:
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
