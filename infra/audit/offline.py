"""``verify --offline FILE``: prove an export without a database (pure).

Reads the records of an NDJSON or CSV export (``format``) one by one and checks:

- the file is an export of a known format, starts with its ``export`` record and ends
  with its ``end`` record, whose counts match (a truncated file fails);
- every account's entries form an unbroken hash chain from the ``start_hash`` and
  ``start_balances`` of its ``account`` record to the ``last_seq``, ``last_hash`` and
  ``balances`` of its ``account_end`` record (``chain.Chain``: every hash recomputed
  from the fields, every link, the sequence, the running balance, the entry ids);
- the entries come in log order (their events' positions increase), so moving an
  entry anywhere in the file is caught even across accounts.

Every problem is a ``chain.Finding`` naming the entry (id, seq) and the line. The
declared ends are only as trustworthy as the file: compare each account's
``last_hash`` with one from a source you trust (the live system's ``verify``, a
statement you kept, or the ``start_hash`` of the next period's export).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.audit.chain import Chain, Finding
from infra.audit.format import CSV_COLUMNS, FORMAT, from_csv_row


@dataclass
class OfflineReport:
    file: str
    format: str
    accounts: int = 0
    entries: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "ok": self.ok,
                "accounts": self.accounts, "entries": self.entries,
                "discrepancies": [f.as_json() for f in self.findings]}


Record = tuple[int, "dict[str, Any] | Finding"]


def ndjson_records(lines: Iterable[str]) -> Iterator[Record]:
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            yield number, Finding("malformed", f"not JSON: {error.msg}", line=number)
            continue
        if not isinstance(record, dict):
            yield number, Finding("malformed", "not a JSON object", line=number)
        else:
            yield number, record


def csv_records(lines: Iterable[str]) -> Iterator[Record]:
    reader = csv.DictReader(lines)
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        yield 1, Finding("malformed", "the CSV header is not the export's columns", line=1)
        return
    for row in reader:
        number = reader.line_num
        try:
            yield number, from_csv_row(row)
        except (ValueError, json.JSONDecodeError) as error:
            yield number, Finding("malformed", str(error), line=number)


def verify_records(records: Iterable[Record], name: str = "-", kind: str = "ndjson"
                   ) -> OfflineReport:
    report = OfflineReport(name, kind)
    found = report.findings
    chains: dict[str, Chain] = {}
    closed: set[str] = set()
    started = ended = False
    last_position = 0
    for line, record in records:
        if isinstance(record, Finding):
            found.append(record)
            continue
        kind_of = record.get("record")
        if ended:
            found.append(Finding("malformed", "a record after the end record", line=line))
            continue
        if not started:
            started = True
            if kind_of != "export" or record.get("format") != FORMAT:
                found.append(Finding("malformed", f"not a {FORMAT} export (its first record "
                                     "must be the export record)", line=line))
            if kind_of == "export":
                continue
        account = record.get("account_id")
        if kind_of == "account":
            if not isinstance(account, str) or account in chains:
                found.append(Finding("malformed", "an account record without an account id, "
                                     "or one seen before", account_id=str(account), line=line))
                continue
            try:
                chains[account] = Chain(account, record["first_seq"], record["start_hash"],
                                        record["start_balances"])
            except (KeyError, TypeError) as error:
                found.append(Finding("malformed", f"account record: {error}",
                                     account_id=account, line=line))
        elif kind_of == "entry":
            event = record.get("event") if isinstance(record.get("event"), dict) else {}
            position = event.get("position")
            chain = chains.get(account) if isinstance(account, str) else None
            if chain is None or account in closed:
                found.append(Finding("malformed", "an entry outside its account's segment "
                                     "(no account record before it, or after its end)",
                                     account_id=str(account), entry_id=record.get("entry_id"),
                                     line=line))
                continue
            report.entries += 1
            problems = chain.feed(record, line=line,
                                  position=position if isinstance(position, int) else None)
            found.extend(problems)
            if not isinstance(position, int) or isinstance(position, bool):
                found.append(Finding("malformed", "the entry's event has no position",
                                     account_id=account, entry_id=record.get("entry_id"),
                                     line=line))
            elif position <= last_position and not any(p.problem == "out_of_order"
                                                        for p in problems):
                found.append(Finding("out_of_order", f"its event's position {position} is not "
                                     f"after the previous entry's ({last_position}): the entry "
                                     "was moved", account_id=account,
                                     entry_id=record.get("entry_id"), seq=record.get("seq"),
                                     line=line, position=position))
            else:
                last_position = max(last_position, position)
        elif kind_of == "account_end":
            chain = chains.get(account) if isinstance(account, str) else None
            if chain is None or account in closed:
                found.append(Finding("malformed", "an account_end without its account record, "
                                     "or a second one", account_id=str(account), line=line))
                continue
            closed.add(account)
            found.extend(chain.close(last_seq=record.get("last_seq"),
                                     entries=record.get("entries"),
                                     last_hash=record.get("last_hash"),
                                     balances=record.get("balances"), line=line))
        elif kind_of == "end":
            ended = True
            if record.get("accounts") != len(chains) or record.get("entries") != report.entries:
                found.append(Finding("end_mismatch", f"the file holds {len(chains)} accounts "
                                     f"and {report.entries} entries, its end record says "
                                     f"{record.get('accounts')} and {record.get('entries')}",
                                     line=line))
        else:
            found.append(Finding("malformed", f"unknown record kind {kind_of!r}", line=line))
    if not started:
        found.append(Finding("malformed", "empty file"))
    for account in sorted(set(chains) - closed):
        found.append(Finding("end_mismatch", "the account's segment has no account_end record: "
                             "the file was cut", account_id=account))
        found.extend(chains[account].close())
    if started and not ended:
        found.append(Finding("end_mismatch", "no end record: the file was cut"))
    report.accounts = len(chains)
    return report


def verify_file(path: Path) -> OfflineReport:
    """Verify an export file, NDJSON when it starts with ``{``, else CSV (``OSError``
    when it cannot be read)."""
    with path.open(encoding="utf-8", newline="") as handle:
        kind = "ndjson" if handle.read(1) == "{" else "csv"
        handle.seek(0)
        records = ndjson_records(handle) if kind == "ndjson" else csv_records(handle)
        return verify_records(records, str(path), kind)
