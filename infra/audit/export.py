"""``export --format ndjson|csv [--from T] [--to T] [--account ID]``: ledger entries and
their events, streamed in log order, with each account's chain (``format``).

One pass over the entry events of the log range: ``--from T`` starts after the as-of
position of the moment before T, ``--to T`` ends at the as-of position of T (an export
to T and one from the next microsecond meet exactly). An account's ``account`` record
goes out before its first entry, with where its chain stood before the range (its
events before that entry folded from the store, no snapshot); its ``account_end``
record after the last entry of the range. Memory: one small state per account.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any
from uuid import UUID

from domain.billing import BillingAccount, account_id_for, entry_record
from domain.canonical import GENESIS_HASH, LEDGER_ENTRY_TAG
from domain.reconciliation import event_topics
from infra.audit.format import BODY_FIELDS, CSV_COLUMNS, FORMAT, to_csv_row
from infra.audit.log import Tick, read_log

ENTRY_TOPICS = sorted(set(event_topics(BillingAccount)) - {BillingAccount.Created.TOPIC})
#: event attributes that are the entry itself or the library's
_NOT_DATA = frozenset(BODY_FIELDS) | {"originator_id", "originator_version", "timestamp",
                                      "prev_hash", "entry_hash"}
HASH_RULE = {"algorithm": "sha256", "tag": LEDGER_ENTRY_TAG, "genesis": GENESIS_HASH,
             "rule": "entry_hash = sha256(tag + '\\n' + canonical_json(body) + prev_hash)",
             "body": ["account_id", *BODY_FIELDS],
             "canonical_json": "sorted keys, no whitespace, UTF-8, null fields left out"}


def plain(value: Any) -> Any:
    """JSON-ready: uuids and instants as text."""
    if isinstance(value, (str, int)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def entry_json(event: BillingAccount.LedgerEntryPosted, position: int,
               topic: str) -> dict[str, Any]:
    """An entry event as an export's ``entry`` record."""
    record = entry_record(event)  # every other field is text, integers or plain legs
    record["entry_id"], record["occurred_at"] = str(event.entry_id), event.occurred_at.isoformat()
    data = plain({key: value for key, value in vars(event).items() if key not in _NOT_DATA})
    return {"record": "entry", "account_id": str(event.originator_id), **record,
            "event": {"position": position, "topic": topic,
                      "version": event.originator_version,
                      "timestamp": event.timestamp.isoformat(), "data": data}}


@dataclass
class _Segment:
    last_seq: int = 0
    entries: int = 0
    last_hash: str = GENESIS_HASH
    balances: dict[str, int] = field(default_factory=dict)


def _account_before(app: Any, account_id: UUID, version: int) -> BillingAccount:
    """The account folded from its events before ``version`` (no snapshot)."""
    account = None
    for event in app.events.get(account_id, lte=version - 1):
        account = event.mutate(account)
    assert account is not None, f"account {account_id} has no opening event"
    return account


def export_records(app: Any, *, after: int, stop: int, account: UUID | None = None,
                   meta: dict[str, Any] | None = None,
                   tick: Tick | None = None) -> Iterator[dict[str, Any]]:
    """The export's records for the entries with ``after`` < position ≤ ``stop``;
    ``account``: one account only (an owner user id or a billing account id)."""
    yield {"record": "export", "format": FORMAT,
           "exported_at": datetime.now(timezone.utc).isoformat(), "from_position": after,
           "to_position": stop, **(meta or {}), "hash": HASH_RULE}
    wanted = None if account is None else {account, account_id_for(account)}
    segments: dict[UUID, _Segment] = {}
    decode = app.mapper.to_domain_event
    total = 0
    for notification in read_log(app, after, stop, ENTRY_TOPICS, tick=tick):
        if wanted is not None and notification.originator_id not in wanted:
            continue
        event = decode(notification)
        segment = segments.get(event.originator_id)
        if segment is None:
            before = _account_before(app, event.originator_id, event.originator_version)
            segment = segments[event.originator_id] = _Segment(
                before.entry_count, 0, before.last_hash, dict(before.balances))
            yield {"record": "account", "account_id": str(before.id),
                   "owner_user_id": str(before.owner_user_id),
                   "primary_currency": before.primary_currency, "first_seq": event.seq,
                   "start_hash": before.last_hash,
                   "start_balances": dict(sorted(before.balances.items()))}
        record = entry_json(event, notification.id, notification.topic)
        segment.last_seq, segment.last_hash = event.seq, event.entry_hash
        segment.balances[event.currency] = event.balance_after_minor
        segment.entries += 1
        total += 1
        yield record
    for account_id in sorted(segments, key=str):
        segment = segments[account_id]
        yield {"record": "account_end", "account_id": str(account_id),
               "last_seq": segment.last_seq, "entries": segment.entries,
               "last_hash": segment.last_hash, "balances": dict(sorted(segment.balances.items()))}
    yield {"record": "end", "accounts": len(segments), "entries": total}


def write(records: Iterator[dict[str, Any]], out: IO[str], kind: str) -> dict[str, Any]:
    """Write the records as ``ndjson`` or ``csv``; returns the ``end`` record."""
    last: dict[str, Any] = {}
    if kind == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow(to_csv_row(record))
            last = record
    elif kind == "ndjson":
        for record in records:
            out.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
            last = record
    else:
        raise ValueError(f"unknown format {kind!r}")
    return last
