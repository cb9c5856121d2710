"""The auditors' command line on Postgres: ``replay``, ``verify``, ``export`` and
``verify --offline``.

One database holds a random history (``tests/property/test_replay_as_of.History``:
adjustments, usage meters, placement claims at instants of its own) with every read
model caught up. ``replay --as-of`` at chosen instants must give what the reference
models held then; ``verify`` must pass, then name a tampered balance row, a removed
ledger entry row and a tampered event; an export must verify offline as written,
and every way of changing it (each entry tampered, deleted, moved; fields one by one;
a re-hashed entry; copies and forgeries inserted) must fail, naming the entry.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg.sql import SQL, Identifier
from typer.testing import CliRunner

from consumers.direct import catch_up
from consumers.rebuild import rebuild
from domain.billing import account_id_for
from infra.audit.chain import entry_hash_of, entry_id_for
from infra.audit.format import from_csv_row, to_csv_row
from infra.audit.log import as_of_position
from infra.audit.offline import csv_records, ndjson_records, verify_records
from infra.cli import cli
from infra.db import Stores
from projections import BY_NAME
from tests.conftest import SECRET, own_stores
from tests.harness import ROOT
from tests.property.test_replay_as_of import History, build, random_steps

US = timedelta(microseconds=1)


@dataclass
class Audited:
    dsn: str
    stores: Stores
    history: History


@pytest.fixture(scope="module")
def audited(services: Any) -> Iterator[Audited]:
    with own_stores(services, run_projector=False) as (database, stores):
        rng = random.Random(20261123)
        steps = random_steps(rng, 150)
        history = build(steps, seed=7, app=stores.app)
        catch_up(stores.app, stores.read_models)
        yield Audited(database.dsn, stores, history)


@pytest.fixture
def run_cli(audited: Audited, monkeypatch: Any, tmp_path: Path) -> Any:
    for name, value in (("PG_DSN", audited.dsn), ("JWT_SECRET", SECRET),
                        ("DATA_DIR", str(tmp_path)), ("REDIS_URL", "")):
        monkeypatch.setenv(f"LEDGERCORE_{name}", value)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> Any:
        result = runner.invoke(cli, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return run


def sql(audited: Audited, statement: Any, *params: Any) -> None:
    with audited.stores.query_pool.connection() as conn:
        conn.execute(statement, params)


# ---- replay -------------------------------------------------------------------------------
def shaped(answer: dict[str, Any]) -> dict[str, Any]:
    """``replay --json`` shaped as ``History.state``."""
    def t(text: str | None) -> datetime | None:
        return None if text is None else datetime.fromisoformat(text)

    return {"balances": {(a["owner_user_id"], c): v for a in answer["accounts"]
                         for c, v in a["balances"].items() if v},
            "usage": {r["id"]: (t(r["start_time"]), t(r["end_time"]), t(r["billed_to"]),
                                r["cost_minor"]) for r in answer["usage"]},
            "claims": {(c["node_id"], c["allocation_id"]): c["status"]
                       for c in answer["open_claims"]}}


def test_replay_gives_the_reference_models_state_at_each_instant(
        audited: Audited, run_cli: Any) -> None:
    history, app = audited.history, audited.stores.app
    moments = sorted({when for when, _ in history.expected})
    # the SQL fast path and the scan of every event agree on every instant
    for moment in moments[::3] + [moments[0] - US, moments[-1] + US]:
        assert as_of_position(app, moment) == as_of_position(app, moment, scan=True)
    picks = [moments[0] - US, moments[0], moments[len(moments) // 3] + US,
             moments[len(moments) // 2], moments[-1] - US, moments[-1] + timedelta(days=1)]
    for instant in picks:
        answer = json.loads(run_cli("replay", "--as-of", instant.isoformat(), "--json").stdout)
        assert answer["position"] == as_of_position(app, instant)
        assert shaped(answer) == history.at(instant), instant
    owner = history.meterers[0]
    mine = json.loads(run_cli("replay", "--as-of", moments[-1].isoformat(), "--account",
                                 str(owner), "--json").stdout)
    want = history.at(moments[-1])
    assert shaped(mine)["balances"] == {k: v for k, v in want["balances"].items()
                                        if k[0] == str(owner)}
    assert {r["owner_user_id"] for r in mine["usage"]} <= {str(owner)}
    human = run_cli("replay", "--as-of", moments[-1].isoformat()).stdout
    assert "balances (minor units):" in human and f"log position {mine['position']:,}" in human


def test_misuse_exits_2(run_cli: Any, tmp_path: Path) -> None:
    run_cli("replay", "--as-of", "yesterday", code=2)
    run_cli("replay", code=2)
    run_cli("replay", "--as-of", "2026-03-01T00:00:00Z", "--account", "nope", code=2)
    run_cli("export", "--format", "xml", code=2)
    run_cli("export", "--from", "2026-03-02", "--to", "2026-03-01", code=2)
    run_cli("verify", "--offline", str(tmp_path / "missing.ndjson"), code=2)


# ---- verify -------------------------------------------------------------------------------
def verified(run_cli: Any, code: int) -> dict[str, Any]:
    return json.loads(run_cli("verify", "--json", code=code).stdout)


def test_verify_passes_then_names_each_tampered_row_and_event(
        audited: Audited, run_cli: Any) -> None:
    clean = verified(run_cli, 0)
    assert clean["ok"] and clean["discrepancies"] == []
    assert clean["ledger_entries"] > 0 and clean["event_store_position"] > 0
    assert all(m["settled"] for m in clean["read_models"])
    assert "everything matches" in run_cli("verify").stdout

    owner = audited.history.payers[0]
    # a balance row changed by hand
    sql(audited, "UPDATE readmodels.balances SET amount_minor = amount_minor + 7"
                 " WHERE owner_user_id = %s AND currency = 'USD'", owner)
    try:
        report = verified(run_cli, 1)
    finally:
        sql(audited, "UPDATE readmodels.balances SET amount_minor = amount_minor - 7"
                     " WHERE owner_user_id = %s AND currency = 'USD'", owner)
    [row] = [d for d in report["discrepancies"] if d.get("table") == "balances"]
    assert row["key"] == {"owner_user_id": str(owner), "currency": "USD"}
    assert row["columns"] == ["amount_minor"]
    assert row["live"]["amount_minor"] == row["expected"]["amount_minor"] + 7
    assert row["event"]["position"] == row["expected"]["notification_id"]
    assert row["event"]["originator_id"] == str(account_id_for(owner))
    text = run_cli("verify", code=0).stdout
    assert "everything matches" in text

    # a ledger entry row removed from the read model
    with audited.stores.query_pool.connection() as conn:
        entry = conn.execute("SELECT * FROM readmodels.ledger_entries ORDER BY notification_id"
                             " LIMIT 1").fetchone()
        conn.execute("DELETE FROM readmodels.ledger_entries WHERE entry_id = %s",
                     (entry["entry_id"],))
    try:
        report = verified(run_cli, 1)
    finally:
        rebuild(audited.stores.app, audited.stores.read_models, BY_NAME["billing_ledger"])
    [gone] = [d for d in report["discrepancies"] if d.get("table") == "ledger_entries"]
    assert gone["key"] == {"entry_id": str(entry["entry_id"])}
    assert "live" not in gone and gone["expected"]["entry_id"] == str(entry["entry_id"])
    assert gone["event"]["position"] == entry["notification_id"]

    # an event changed in the event store: its entry's hash no longer holds, and every
    # read-model row built from it differs from the live one
    recorder = audited.stores.app.recorder
    table = SQL("{0}.{1}").format(Identifier(recorder.datastore.schema),
                                  Identifier(recorder.events_table_name))
    at = entry["notification_id"]
    amount = f'"amount_minor":{entry["amount_minor"]},'
    forged = f'"amount_minor":{entry["amount_minor"] + 1},'
    tamper = SQL("UPDATE {0} SET state = convert_to(replace(convert_from(state, 'UTF8'), %s, %s),"
                 " 'UTF8') WHERE notification_id = %s").format(table)
    sql(audited, tamper, amount, forged, at)
    try:
        report = verified(run_cli, 1)
        printed = run_cli("verify", code=1).stdout
    finally:
        sql(audited, tamper, forged, amount, at)
    chain = [d for d in report["discrepancies"] if d["check"] == "hash_chain"]
    assert chain and chain[0]["finding"]["problem"] == "tampered"
    assert chain[0]["finding"]["entry_id"] == str(entry["entry_id"])
    assert chain[0]["position"] == at
    assert any(d.get("table") == "ledger_entries" and d["columns"] == ["amount_minor"]
               and d["event"]["position"] == at for d in report["discrepancies"])
    assert str(entry["entry_id"]) in printed and f"explained by event {at}" in printed
    assert verified(run_cli, 0)["ok"]


# ---- export and offline verification -----------------------------------------------------
def exported(run_cli: Any, tmp_path: Path, *args: str, kind: str = "ndjson") -> Path:
    out = tmp_path / f"export-{len(list(tmp_path.iterdir()))}.{kind}"
    summary = json.loads(run_cli("export", "--format", kind, "--out", str(out), "--json",
                                    *args).stdout)
    assert summary["file"] == str(out)
    return out


def entries_in_store(audited: Audited) -> int:
    with audited.stores.query_pool.connection() as conn:
        return conn.execute("SELECT count(*) AS n FROM readmodels.ledger_entries").fetchone()["n"]


def test_exports_verify_offline_and_periods_meet(audited: Audited, run_cli: Any,
                                                 tmp_path: Path) -> None:
    whole = exported(run_cli, tmp_path)
    as_csv = exported(run_cli, tmp_path, kind="csv")
    for path in (whole, as_csv):
        report = json.loads(run_cli("verify", "--offline", str(path), "--json").stdout)
        assert report["ok"] and report["entries"] == entries_in_store(audited), report
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    with as_csv.open(newline="") as handle:  # the same records (bar the export's time)
        rows = [from_csv_row(row) for row in csv.DictReader(handle)]
    assert [{**r, "exported_at": None} for r in rows] == \
        [{**r, "exported_at": None} for r in records]
    text = run_cli("verify", "--offline", str(whole)).stdout
    assert "every chain holds" in text

    # two periods that meet: the first ends where the second starts, account by account
    moments = sorted({when for when, _ in audited.history.expected})
    middle = moments[len(moments) // 2]
    first = exported(run_cli, tmp_path, "--to", middle.isoformat())
    second = exported(run_cli, tmp_path, "--from", (middle + US).isoformat())
    ends, starts, count = {}, {}, 0
    for path in (first, second):
        assert json.loads(run_cli("verify", "--offline", str(path), "--json").stdout)["ok"]
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if path == first and record["record"] == "account_end":
                ends[record["account_id"]] = record["last_hash"]
            if path == second and record["record"] == "account":
                starts[record["account_id"]] = record["start_hash"]
            count += record["record"] == "entry"
    assert count == entries_in_store(audited)
    assert all(starts[a] == ends[a] for a in set(starts) & set(ends))
    assert any(set(starts) & set(ends)), "no account spans both periods"
    # the first period ends where a replay as of its last instant stands
    then = json.loads(run_cli("replay", "--as-of", middle.isoformat(), "--json").stdout)
    closing = {r["account_id"]: r for r in map(json.loads, first.read_text().splitlines())
               if r["record"] == "account_end"}
    assert {a["account_id"]: (a["last_hash"], {c: v for c, v in a["balances"].items() if v})
            for a in then["accounts"] if a["entries"]} == \
        {k: (r["last_hash"], {c: v for c, v in r["balances"].items() if v})
         for k, r in closing.items()}

    owner = audited.history.payers[0]
    one = exported(run_cli, tmp_path, "--account", str(owner))
    report = json.loads(run_cli("verify", "--offline", str(one), "--json").stdout)
    assert report["ok"] and report["accounts"] == 1


def lines_of(run_cli: Any, tmp_path: Path) -> list[dict[str, Any]]:
    path = exported(run_cli, tmp_path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def check(records: list[dict[str, Any]]) -> Any:
    text = [json.dumps(r) for r in records]
    return verify_records(ndjson_records(text))


def named(report: Any) -> set[str]:
    return {f.entry_id for f in report.findings if f.entry_id}


def rehash(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "entry_hash": entry_hash_of(entry["account_id"], entry)}


def test_offline_verification_names_every_tampered_deleted_or_moved_entry(
        run_cli: Any, tmp_path: Path) -> None:
    records = lines_of(run_cli, tmp_path)
    assert check(records).ok
    entries = [i for i, r in enumerate(records) if r["record"] == "entry"]
    assert len(entries) >= 20
    for i in entries:
        entry = records[i]
        changed = {**entry, "amount_minor": entry["amount_minor"] + 1}
        report = check(records[:i] + [changed] + records[i + 1:])
        assert not report.ok and entry["entry_id"] in named(report), ("tampered", i)
        report = check(records[:i] + records[i + 1:])
        assert not report.ok and entry["entry_id"] in named(report), ("deleted", i)
        missing = [f for f in report.findings if f.problem == "missing"]
        assert [f.entry_id for f in missing] == [entry["entry_id"]]
        if i + 1 in entries:  # swapped with the next entry (of any account)
            report = check(records[:i] + [records[i + 1], entry] + records[i + 2:])
            assert not report.ok and entry["entry_id"] in named(report), ("reordered", i)
        # changed and re-hashed: the entry holds, the link to it (or the chain's end) breaks
        report = check(records[:i] + [rehash({**entry, "reference_id": "forged"})]
                       + records[i + 1:])
        assert not report.ok and entry["entry_id"] in named(report), ("re-hashed", i)


FIELDS = {"entry_type": "forged", "currency": "JPY", "reference_type": "x",
          "reference_id": "other", "occurred_at": "2026-03-01T12:00:00.000001+00:00",
          "correlation_id": "forged", "balance_after_minor": 1, "seq": 99,
          "entry_id": "00000000-0000-4000-8000-000000000000", "prev_hash": "1" * 64,
          "entry_hash": "f" * 64, "legs": [{"account": "adjustments", "amount_minor": 0}],
          "account_id": "00000000-0000-4000-8000-000000000001", "amount_minor": 1.0}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_offline_verification_catches_a_change_to_any_field(
        field: str, run_cli: Any, tmp_path: Path) -> None:
    records = lines_of(run_cli, tmp_path)
    entries = [i for i, r in enumerate(records) if r["record"] == "entry"]
    i = entries[len(entries) // 2]
    original = records[i]
    report = check(records[:i] + [{**original, field: FIELDS[field]}] + records[i + 1:])
    assert not report.ok
    if field in ("entry_id", "account_id"):  # the entry is named by what it claims, or
        assert {original["entry_id"], FIELDS["entry_id"]} & named(report)  # found missing
    else:
        assert original["entry_id"] in named(report), [str(f) for f in report.findings]


def test_offline_verification_catches_insertions_and_cuts(run_cli: Any,
                                                          tmp_path: Path) -> None:
    records = lines_of(run_cli, tmp_path)
    entries = [i for i, r in enumerate(records) if r["record"] == "entry"]
    i = entries[3]
    entry = records[i]
    copy = check(records[:i + 1] + [entry] + records[i + 1:])
    assert not copy.ok and any(f.problem == "duplicate" and f.entry_id == entry["entry_id"]
                               for f in copy.findings)
    # a forged next entry, hashed and linked correctly, after an account's last one
    last = max(entries, key=lambda j: (records[j]["account_id"] == entry["account_id"], j))
    tail = records[last]
    seq = tail["seq"] + 1
    forged = rehash({**tail, "seq": seq, "entry_id": entry_id_for(tail["account_id"], seq),
                     "prev_hash": tail["entry_hash"], "amount_minor": 5,
                     "balance_after_minor": tail["balance_after_minor"] + 5,
                     "event": {**tail["event"], "position": tail["event"]["position"] + 1}})
    forged["legs"] = [{**tail["legs"][0], "amount_minor": 5},
                      {**tail["legs"][1], "amount_minor": -5}]
    forged = rehash(forged)
    report = check(records[:last + 1] + [forged] + records[last + 1:])
    assert not report.ok and forged["entry_id"] in named(report)
    # a file cut short
    report = check(records[:entries[-1]])
    assert not report.ok and any(f.problem == "end_mismatch" for f in report.findings)


def test_offline_verification_of_a_tampered_csv_from_the_command_line(
        run_cli: Any, tmp_path: Path) -> None:
    path = exported(run_cli, tmp_path, kind="csv")
    lines = path.read_text().splitlines()
    rows = list(csv_records(lines))
    j, entry = next((n, r) for n, r in rows if isinstance(r, dict) and r["record"] == "entry")
    tampered = to_csv_row({**entry, "reference_id": "tampered"})
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=list(tampered), lineterminator="\n").writerow(tampered)
    lines[j - 1] = buffer.getvalue().rstrip("\n")
    bad = tmp_path / "tampered.csv"
    bad.write_text("\n".join(lines) + "\n")
    # a real process: exit status 1 and the entry named on standard output
    result = subprocess.run([sys.executable, "-m", "infra.cli", "verify", "--offline", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "LEDGERCORE_JWT_SECRET": "x" * 32})
    assert result.returncode == 1, result.stderr
    assert entry["entry_id"] in result.stdout and "tampered" in result.stdout
    deleted = tmp_path / "deleted.csv"
    deleted.write_text("\n".join(lines[:j - 1] + lines[j:]) + "\n")
    report = json.loads(run_cli("verify", "--offline", str(deleted), "--json", code=1).stdout)
    assert any(d["problem"] == "missing" and d["entry_id"] == entry["entry_id"]
               for d in report["discrepancies"])
