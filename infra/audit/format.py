"""The export's records and their CSV form (pure: the offline verifier reads them too).

An export is a sequence of records, each a JSON object with a ``record`` kind:

- ``export`` (first): the format, what was exported (positions, instants, account) and
  the hash rule;
- ``account``: opens an account's chain segment before its first entry: owner, primary
  currency, ``first_seq``, ``start_hash`` (the ``entry_hash`` of the entry before the
  segment; 64 zeros at the start of the chain) and ``start_balances``;
- ``entry``: one ledger entry, every field its hash covers plus ``prev_hash`` and
  ``entry_hash``, and ``event``: the event that posted it (``position`` in the log,
  ``topic``, ``version`` in the account's stream, ``timestamp``, ``data``: the event's
  other fields, provenance included, which the hash does not cover);
- ``account_end`` (after every entry, one per account): ``last_seq``, ``entries``,
  ``last_hash`` and ``balances`` of the segment;
- ``end`` (last): how many accounts and entries the file holds.

Entries come in log order (increasing ``event.position``), so each account's entries
come in ``seq`` order. NDJSON is one record per line. CSV has one row per record with
the columns below; a column a record does not use is empty, an empty nullable text
field is null, and JSON-valued columns (``legs``, ``event_data``, balances, ``meta``)
hold JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

FORMAT = "ledgercore.audit-export.v1"
#: the fields an entry's hash covers besides the account (``billing.entry_body``)
BODY_FIELDS = ("entry_id", "seq", "entry_type", "amount_minor", "currency", "reference_type",
               "reference_id", "legs", "balance_after_minor", "occurred_at", "correlation_id")
ENTRY_FIELDS = ("account_id",) + BODY_FIELDS + ("prev_hash", "entry_hash")
NULLABLE = frozenset({"reference_type", "reference_id", "correlation_id"})

CSV_COLUMNS = ("record",) + ENTRY_FIELDS + (
    "event_position", "event_topic", "event_version", "event_timestamp", "event_data",
    "owner_user_id", "primary_currency", "first_seq", "start_hash", "start_balances",
    "last_seq", "entries", "last_hash", "balances", "meta")
INT_COLUMNS = frozenset({"seq", "amount_minor", "balance_after_minor", "event_position",
                         "event_version", "first_seq", "last_seq", "entries"})
JSON_COLUMNS = frozenset({"legs", "event_data", "start_balances", "balances", "meta"})
#: columns each kind of record fills (besides ``record``); the rest go to ``meta``
ACCOUNT_COLUMNS = ("account_id", "owner_user_id", "primary_currency", "first_seq", "start_hash",
                   "start_balances")
ACCOUNT_END_COLUMNS = ("account_id", "last_seq", "entries", "last_hash", "balances")
_INT = re.compile(r"-?[0-9]+")


def to_csv_row(record: dict[str, Any]) -> dict[str, str]:
    """One record as a CSV row (every column, ``""`` where unused)."""
    kind = record["record"]
    row = {column: "" for column in CSV_COLUMNS}
    row["record"] = kind
    if kind == "entry":
        values = {field: record[field] for field in ENTRY_FIELDS}
        event = record["event"]
        values.update(event_position=event["position"], event_topic=event["topic"],
                      event_version=event["version"], event_timestamp=event["timestamp"],
                      event_data=event["data"])
    elif kind in ("account", "account_end"):
        columns = ACCOUNT_COLUMNS if kind == "account" else ACCOUNT_END_COLUMNS
        values = {column: record[column] for column in columns}
    else:
        values = {"meta": {k: v for k, v in record.items() if k != "record"}}
    for column, value in values.items():
        if value is None:
            row[column] = ""
        elif column in JSON_COLUMNS:
            row[column] = json.dumps(value, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False)
        else:
            row[column] = str(value)
    return row


def _cell(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in INT_COLUMNS:
        return int(text) if _INT.fullmatch(text) else text  # a non-integer fails the checks
    if column in JSON_COLUMNS:
        return json.loads(text)
    return text


def from_csv_row(row: dict[str, str]) -> dict[str, Any]:
    """The record a CSV row holds (``ValueError`` when it is not one)."""
    kind = row.get("record") or ""
    cells = {column: _cell(column, row.get(column) or "") for column in CSV_COLUMNS
             if column != "record"}
    if kind == "entry":
        record: dict[str, Any] = {"record": kind}
        record.update({field: cells[field] for field in ENTRY_FIELDS})
        record["event"] = {"position": cells["event_position"], "topic": cells["event_topic"],
                           "version": cells["event_version"],
                           "timestamp": cells["event_timestamp"], "data": cells["event_data"]}
        return record
    if kind in ("account", "account_end"):
        columns = ACCOUNT_COLUMNS if kind == "account" else ACCOUNT_END_COLUMNS
        return {"record": kind, **{column: cells[column] for column in columns}}
    if kind in ("export", "end"):
        meta = cells["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"a {kind} row needs its meta column")
        return {"record": kind, **meta}
    raise ValueError(f"unknown record kind {kind!r}")
