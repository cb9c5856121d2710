"""``verify``: recompute every read model and every balance from the events, compare
with the live read models, and check every account's hash chain and stored snapshots.

All of it runs in one Postgres transaction that is rolled back at the end, so verify
leaves nothing behind (a crash too):

1. The transaction's snapshot (REPEATABLE READ) fixes what the live read models hold
   and their positions: each read model is compared *at its own position* (the lowest
   watermark over the transport's sources). A read model that has applied events
   beyond that watermark (a Kafka projector between a batch and its watermark) is
   waited for, up to ``settle_seconds``; if it never settles it is reported as not
   verified.
2. In that transaction, a scratch schema gets every read model's tables; one pass over
   the log (up to the event store's head) applies each page of events to every read
   model up to its position (the projectors' own code, in the order and batches the
   live store applies them), feeds every ledger entry to its account's ``chain.Chain``
   and folds every billing account (the domain's own ``apply``).
3. Every table is compared row by row with its live twin (``EXCEPT ALL`` both ways,
   rows paired by primary key); each difference names the table, the row's key, the
   differing columns, and the event that explains the row (the last event that wrote
   it, from its ``notification_id``).
4. Independently of the projectors' SQL, the recomputed balances are compared with
   the domain's fold of the entries; every chain is closed against its account's
   folded state; every account's stored snapshot is checked
   (``reconciliation.snapshot_problems``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import dict_row
from psycopg.sql import SQL, Identifier

import projections
from domain.billing import BillingAccount
from domain.reconciliation import snapshot_problems
from infra.audit.chain import Chain, Finding
from infra.audit.export import entry_json, plain
from infra.audit.log import head, prefetched, read_pages
from projections.store import SCHEMA, Item, apply_items, position, tracking_name

#: differing rows listed per table (the count says how many there are)
MAX_ROWS = 100
#: discrepancies whose explaining event is looked up
MAX_EXPLAINED = 200


@dataclass
class Discrepancy:
    check: str  # read_model | balance | hash_chain | snapshot
    detail: str
    read_model: str | None = None
    table: str | None = None
    key: dict[str, Any] | None = None
    columns: list[str] | None = None
    live: dict[str, Any] | None = None
    expected: dict[str, Any] | None = None
    finding: dict[str, Any] | None = None
    position: int | None = None
    event: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: plain(v) for k, v in vars(self).items() if v is not None}

    def __str__(self) -> str:
        where = ".".join(x for x in (self.read_model, self.table) if x)
        text = f"[{self.check}{' ' + where if where else ''}] {self.detail}"
        if self.key:
            text += " — row " + ", ".join(f"{k}={v}" for k, v in self.key.items())
        if self.columns and self.live is not None and self.expected is not None:
            text += "; " + "; ".join(f"{c}: live {plain(self.live.get(c))!r}, from events "
                                     f"{plain(self.expected.get(c))!r}" for c in self.columns)
        if self.event:
            e = self.event
            text += (f"\n    explained by event {e['position']} {e['topic']} of "
                     f"{e['originator_id']} v{e['version']} at {e['timestamp']}")
        elif self.position:
            text += f"\n    at event {self.position}"
        return text


@dataclass
class ReadModelState:
    name: str
    position: int
    applied: int
    settled: bool
    rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "position": self.position, "settled": self.settled,
                "rows": self.rows, **({"error": self.error} if self.error else {})}


@dataclass
class Report:
    verified_at: datetime
    head: int
    read_models: list[ReadModelState] = field(default_factory=list)
    accounts: int = 0
    entries: int = 0
    events: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.discrepancies and all(r.settled and not r.error
                                              for r in self.read_models)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "verified_at": self.verified_at.isoformat(),
                "event_store_position": self.head, "events_read": self.events,
                "accounts": self.accounts, "ledger_entries": self.entries,
                "read_models": [r.as_json() for r in self.read_models],
                "discrepancies": [d.as_json() for d in self.discrepancies]}


def _snapshot_positions(conn: psycopg.Connection[Any], source: str, settle_seconds: float
                        ) -> dict[str, tuple[int, int]]:
    """Open the snapshot; {read model: (position, highest applied)}, retried until every
    read model has applied nothing beyond its position or ``settle_seconds`` pass."""
    deadline = time.monotonic() + settle_seconds
    while True:
        conn.rollback()
        found = {}
        with conn.cursor() as cur:
            for projection in projections.ALL:
                at = position(cur, projection.name, source, SCHEMA)
                cur.execute(SQL("SELECT max(notification_id) AS n FROM {0}.projection_tracking"
                                " WHERE application_name LIKE %s").format(Identifier(SCHEMA)),
                            (tracking_name(projection.name, source) + "%",))
                row = cur.fetchone()
                found[projection.name] = (at, int((row or {}).get("n") or 0))
        if all(applied <= at for at, applied in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def _source(stores: Any) -> str:
    """The transport's sources (``log`` or ``kafka:<topic>/``): the configured one, or
    the one the read models were projected from when only that one has positions."""
    configured = stores.position_source_prefix()
    with stores.query_pool.connection() as conn:
        rows = conn.execute(SQL("SELECT DISTINCT source FROM {0}.read_positions")
                            .format(Identifier(SCHEMA))).fetchall()
    sources = {row["source"] for row in rows}
    if not sources or any(s.startswith(configured) for s in sources):
        return configured
    kafka = sorted(s for s in sources if s.startswith("kafka:"))
    return "log" if "log" in sources else kafka[0].rsplit("/", 1)[0] + "/"


def _columns(cur: psycopg.Cursor[Any], schema: str, table: str) -> tuple[list[str], list[str]]:
    """(columns in order, primary key columns) of a table."""
    cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
                " AND table_name = %s ORDER BY ordinal_position", (schema, table))
    columns = [row["column_name"] for row in cur.fetchall()]
    cur.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary"
                " ORDER BY array_position(i.indkey, a.attnum)",
                (f'"{schema}"."{table}"',))
    return columns, [row["attname"] for row in cur.fetchall()]


def _except(cur: psycopg.Cursor[Any], columns: list[str], left: str, right: str, table: str
            ) -> list[dict[str, Any]]:
    cols = SQL(", ").join(Identifier(c) for c in columns)
    cur.execute(SQL("SELECT {0} FROM {1}.{3} EXCEPT ALL SELECT {0} FROM {2}.{3} LIMIT %s").format(
        cols, Identifier(left), Identifier(right), Identifier(table)), (MAX_ROWS + 1,))
    return list(cur.fetchall())


def compare_table(cur: psycopg.Cursor[Any], name: str, scratch: str, table: str
                  ) -> tuple[int, list[Discrepancy]]:
    """(rows recomputed, differences) between the live table and its scratch twin."""
    columns, key = _columns(cur, scratch, table)
    cur.execute(SQL("SELECT count(*) AS n FROM {0}.{1}").format(Identifier(scratch),
                                                                Identifier(table)))
    rows = int(cur.fetchone()["n"])
    live = _except(cur, columns, SCHEMA, scratch, table)
    expected = _except(cur, columns, scratch, SCHEMA, table)
    key = key or columns

    def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(plain(row[k]) for k in key)

    live_by, expected_by = {key_of(r): r for r in live}, {key_of(r): r for r in expected}
    found = []
    for k in sorted(set(live_by) | set(expected_by), key=str)[:MAX_ROWS]:
        got, want = live_by.get(k), expected_by.get(k)
        if got is not None and want is not None:
            differing = [c for c in columns if plain(got[c]) != plain(want[c])]
            detail = "the row differs from the one the events give"
        elif got is not None:
            differing, detail = None, "the read model holds a row no event gives"
        else:
            differing, detail = None, "the read model lacks a row the events give"
        at = (want or got or {}).get("notification_id")
        found.append(Discrepancy("read_model", detail, read_model=name, table=table,
                                 key=dict(zip(key, k)), columns=differing, live=got,
                                 expected=want, position=at if isinstance(at, int) else None))
    if len(live) > MAX_ROWS or len(expected) > MAX_ROWS:
        found.append(Discrepancy("read_model", f"more than {MAX_ROWS} rows differ; the first "
                                 f"{MAX_ROWS} are listed", read_model=name, table=table))
    return rows, found


def _apply(conn: psycopg.Connection[Any], projection: Any, scratch: str,
           items: list[Item]) -> tuple[str, int] | None:
    """Apply to the scratch tables; on failure (error, position of the failing event)."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            apply_items(projection, cur, scratch, items)
        return None
    except Exception:  # noqa: BLE001 - find the event, report it
        pass
    for item in items:
        try:
            with conn.transaction(), conn.cursor() as cur:
                apply_items(projection, cur, scratch, [item])
        except Exception as error:  # noqa: BLE001
            return f"{type(error).__name__}: {error}", item.notification_id
    return "the batch failed but each of its events applied alone", items[-1].notification_id


def explain(app: Any, at: int) -> dict[str, Any] | None:
    """The event at log position ``at``, in brief."""
    found = app.recorder.select_notifications(start=at, limit=1)
    if not found or found[0].id != at:
        return None
    event = app.mapper.to_domain_event(found[0])
    return {"position": at, "topic": found[0].topic, "originator_id": str(event.originator_id),
            "version": event.originator_version, "timestamp": event.timestamp.isoformat()}


def verify(stores: Any, *, settle_seconds: float = 10.0,
           progress: Callable[[str, int], Any] | None = None) -> Report:
    """Run every check (see the module docstring). ``progress(label, total)`` gives a
    context manager yielding ``tick(done)``, for the long steps."""
    from contextlib import nullcontext

    def bar(label: str, total: int) -> Any:
        return progress(label, total) if progress else nullcontext(lambda done: None)

    app = stores.app
    source = _source(stores)
    report = Report(datetime.now(timezone.utc), 0)
    conn = psycopg.connect(stores.settings.pg_dsn, row_factory=dict_row)
    try:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        at = _snapshot_positions(conn, source, settle_seconds)
        report.head = head(app)
        states = {p.name: ReadModelState(p.name, at[p.name][0], at[p.name][1],
                                         at[p.name][1] <= at[p.name][0])
                  for p in projections.ALL}
        report.read_models = list(states.values())
        scratch = f"audit_verify_{uuid.uuid4().hex[:12]}"
        with conn.cursor() as cur:
            cur.execute(SQL("CREATE SCHEMA {0}").format(Identifier(scratch)))
            for projection in projections.ALL:
                for statement in projection.ddl(scratch):
                    cur.execute(statement)
        live = [p for p in projections.ALL if states[p.name].settled]
        billing_at = states["billing_ledger"].position
        accounts: dict[Any, BillingAccount] = {}
        chains: dict[Any, Chain] = {}
        at_billing: dict[tuple[str, str], tuple[int, int]] = {}  # balance, position
        with bar("verify: replaying the log", report.head) as tick:
            for page in prefetched(read_pages(app, 0, report.head, tick=tick)):
                items = [Item(n.id, app.mapper.to_domain_event(n)) for n in page]
                for n, item in zip(page, items):
                    event = item.event
                    if not isinstance(event, BillingAccount.Event):
                        continue
                    account = accounts[event.originator_id] = event.mutate(
                        accounts.get(event.originator_id))
                    if isinstance(event, BillingAccount.LedgerEntryPosted):
                        report.entries += 1
                        chain = chains.setdefault(event.originator_id,
                                                  Chain(str(event.originator_id)))
                        for finding in chain.feed(entry_json(event, n.id, n.topic),
                                                  position=n.id):
                            report.discrepancies.append(_chain(finding))
                        if n.id <= billing_at:
                            at_billing[(str(account.owner_user_id), event.currency)] = (
                                event.balance_after_minor, n.id)
                report.events += len(items)
                for projection in live:
                    state = states[projection.name]
                    if state.error:
                        continue
                    mine = [i for i in items if i.notification_id <= state.position]
                    failed = _apply(conn, projection, scratch, mine) if mine else None
                    if failed is not None:
                        state.error = failed[0]
                        report.discrepancies.append(Discrepancy(
                            "read_model", f"the projector fails on an event: {failed[0]}",
                            read_model=projection.name, position=failed[1]))
        report.accounts = len(accounts)
        compared = [p for p in live if not states[p.name].error]
        with bar("verify: comparing tables", sum(len(p.tables) for p in compared)) as tick:
            done = 0
            for projection in compared:
                for table in projection.tables:
                    try:
                        with conn.transaction(), conn.cursor() as cur:
                            rows, found = compare_table(cur, projection.name, scratch, table)
                        states[projection.name].rows[table] = rows
                        report.discrepancies += found
                    except psycopg.Error as error:
                        report.discrepancies.append(Discrepancy(
                            "read_model", f"cannot compare the table: {error}".strip(),
                            read_model=projection.name, table=table))
                    done += 1
                    tick(done)
        if "billing_ledger" in {p.name for p in compared}:
            report.discrepancies += _balances(conn, scratch, at_billing)
        for account_id, account in sorted(accounts.items(), key=lambda kv: str(kv[0])):
            chain = chains.get(account_id) or Chain(str(account_id))
            for finding in chain.close(last_seq=account.entry_count, entries=account.entry_count,
                                       last_hash=account.last_hash, balances=account.balances):
                report.discrepancies.append(_chain(finding))
        for problem in snapshot_problems(app, accounts):
            report.discrepancies.append(Discrepancy("snapshot", problem))
    finally:
        conn.rollback()
        conn.close()
    for discrepancy in report.discrepancies[:MAX_EXPLAINED]:
        if discrepancy.position:
            discrepancy.event = explain(app, discrepancy.position)
    return report


def _chain(finding: Finding) -> Discrepancy:
    return Discrepancy("hash_chain", str(finding), finding=finding.as_json(),
                       position=finding.position)


def _balances(conn: psycopg.Connection[Any], scratch: str,
              folded: dict[tuple[str, str], tuple[int, int]]) -> list[Discrepancy]:
    """The projector's recomputed balances against the domain's fold of the entries."""
    with conn.cursor() as cur:
        cur.execute(SQL("SELECT owner_user_id, currency, amount_minor FROM {0}.balances")
                    .format(Identifier(scratch)))
        projected = {(str(r["owner_user_id"]), r["currency"]): int(r["amount_minor"])
                     for r in cur.fetchall()}
    found = []
    for key in sorted(set(projected) | set(folded)):
        want = folded.get(key, (0, None))
        if projected.get(key, 0) != want[0]:
            found.append(Discrepancy(
                "balance", f"the billing_ledger projector gives {projected.get(key)} but the "
                f"entries give {want[0]}", key={"owner_user_id": key[0], "currency": key[1]},
                position=want[1]))
    return found
