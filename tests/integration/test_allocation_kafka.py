"""A lease end to end through HTTP over the Kafka transport (API → event store → relay
→ broker → projector process → read models): fund a user, launch, the node agent
(this test, through the internal task channel) provisions it, the lease runs for a
few real seconds, is released and the agent reports the release. Then the money must
add up everywhere: the balance the read model answers dropped by exactly the usage
record's cost, which is the sum of the ``usage_charge`` entries and of the rated
lines; the account's hash chain verifies (from the aggregate's events and from the
read model's rows); the claim and the quota slot are free again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import mint_token
from domain.allocations import quota_id_for
from domain.billing import BillingAccount, account_id_for, entry_record, verify_chain
from domain.usage import usage_id_for_allocation
from tests.contract.test_contract import check
from tests.harness import CliProcess, ServerThread, bearer, client
from tests.integration.test_inventory_commands import LAUNCH, baremetal_sku, make_node, make_sku

pytestmark = pytest.mark.kafka

#: 3,600,000 minor units a node-hour = 1 per millisecond: the cost is the metered
#: milliseconds exactly, with no rounding to hide a slice billed twice or lost
PRICE = 3_600_000
FUNDS = 1_000_000
RELEASE = "/api/v1/allocations/{allocation_id}/release"
WAIT = "/internal/v1/nodes/{node_id}/tasks/wait"
RESULT = "/internal/v1/nodes/{node_id}/tasks/{task_id}/result"


@pytest.fixture
def kafka_server(new_database: Any, settings_for: Any, stores_for: Any, broker: Any,
                 tmp_path: Any) -> Iterator[tuple[str, Any]]:
    """The API on the Kafka transport, with a ``relay`` and a ``project`` process."""
    database = new_database()
    topic = f"ledgercore.test.{uuid.uuid4().hex[:8]}"
    settings = settings_for(database.dsn, transport="kafka", kafka_bootstrap=broker.bootstrap,
                            kafka_topic=topic, kafka_partitions=3, read_wait_seconds=60)
    stores = stores_for(settings)
    env = {"LEDGERCORE_PG_DSN": database.dsn, "LEDGERCORE_KAFKA_BOOTSTRAP": broker.bootstrap,
           "LEDGERCORE_TRANSPORT": "kafka", "LEDGERCORE_KAFKA_TOPIC": topic,
           "LEDGERCORE_KAFKA_PARTITIONS": "3", "LEDGERCORE_JWT_SECRET": settings.jwt_secret,
           "LEDGERCORE_KAFKA_GROUP": f"projectors-{topic}", "LEDGERCORE_DATA_DIR": str(tmp_path)}
    processes = [CliProcess([command], env, command).start() for command in ("relay", "project")]
    try:
        with ServerThread(create_app(settings, stores)) as server:
            yield server.url, stores
    finally:
        for process in processes:
            process.stop()


def agent_step(http: httpx.Client, token: str, node_id: str, phase: str) -> httpx.Response:
    """The node agent picks up the next task (``phase``'s) and reports success."""
    task = http.get(WAIT.format(node_id=node_id), headers=bearer(token))
    check("GET", WAIT, task)
    assert task.status_code == 200, task.text
    assert task.json()["params"]["phase"] == phase and task.json()["node_id"] == node_id
    result = http.post(RESULT.format(node_id=node_id, task_id=task.json()["task_id"]),
                       headers=bearer(token),
                       json={"status": "success", "output": {},
                             "completed_at": datetime.now(timezone.utc).isoformat()})
    check("POST", RESULT, result)
    assert result.status_code == 200, result.text
    return result


def read(http: httpx.Client, headers: dict[str, str], path: str, position: str, **params: Any) -> Any:
    response = http.get(path, params=params, headers={**headers, "X-Ledger-Position": position})
    check("GET", path, response)
    assert response.status_code == 200, response.text
    assert response.headers["X-Read-Model-Cache"] != "stale", f"{path}: the read model did not catch up"
    return response.json()


def ms_between(start: str, end: str) -> int:
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def test_a_lease_through_kafka_is_billed_exactly_its_metered_time(kafka_server: Any,
                                                                  tokens: Any) -> None:
    base, stores = kafka_server
    admin, sku = tokens.admin(), f"kf-{uuid.uuid4().hex[:6]}"
    user, project = uuid.uuid4(), uuid.uuid4()
    token = mint_token(tokens.secret, user_id=user, project_ids=[str(project)])
    scoped = {**bearer(token), "X-Project-ID": str(project)}
    with client(base) as http:
        make_sku(http, admin, {**baremetal_sku(sku),
                               "unit_price": {"amount_minor": PRICE, "currency": "USD"}})
        node_id = make_node(http, admin, sku)["id"]
        node_token = mint_token(tokens.secret, user_id=node_id, actor_type="node")
        funded = http.post(f"/api/v1/admin/users/{user}/balance", headers=bearer(admin), json={
            "direction": "credit", "amount_minor": FUNDS, "currency": "USD", "reason": "kafka e2e"})
        assert funded.status_code == 200, funded.text
        before = read(http, scoped, "/api/v1/billing/balance", funded.headers["X-Ledger-Position"])
        assert before["balance"]["amount_minor"] == FUNDS  # the credit went through Kafka too

        launched = http.post(LAUNCH, json={"sku": sku},
                             headers={**scoped, "Idempotency-Key": uuid.uuid4().hex})
        check("POST", LAUNCH, launched)
        assert launched.status_code == 202, launched.text
        allocation_id = launched.json()["workload_id"]
        agent_step(http, node_token, node_id, "provision")
        assert stores.app.get_or_none(uuid.UUID(allocation_id)).status == "active"
        time.sleep(2.0)  # metered time
        released = http.post(RELEASE.format(allocation_id=allocation_id), headers=scoped)
        check("POST", RELEASE, released)
        assert released.status_code == 202 and released.json()["allocation"]["status"] == "releasing"
        last = agent_step(http, node_token, node_id, "release").headers["X-Ledger-Position"]

        # the usage record: one, closed, billed exactly its milliseconds
        [record] = read(http, scoped, "/api/v1/billing/usage", last,
                        allocation_id=allocation_id)["items"]
        assert record["id"] == str(usage_id_for_allocation(uuid.UUID(allocation_id)))
        assert record["end_time"] is not None and record["last_billed_at"] == record["end_time"]
        cost = record["cost"]["amount_minor"]
        assert cost == ms_between(record["start_time"], record["end_time"])
        assert 2000 <= cost < 60_000
        lines = read(http, scoped, "/api/v1/billing/rated-usage", last,
                     usage_record_id=record["id"])["items"]
        assert lines and sum(line["amount"]["amount_minor"] for line in lines) == cost
        # the balance the read model answers dropped by exactly that
        after = read(http, scoped, "/api/v1/billing/balance", last)
        assert after["balance"] == {"amount_minor": FUNDS - cost, "currency": "USD"}
        limits = read(http, scoped, "/api/v1/allocations/limits", last)
        assert limits["current_concurrent_allocations"] == 0
        gone = http.post(RELEASE.format(allocation_id=allocation_id), headers=scoped)
        assert gone.status_code == 409 and gone.json()["code"] == "allocation_not_active"

    # the event store: the charges are the record's cost, and the chain holds
    account_id = account_id_for(user)
    entries = [e for e in stores.app.events.get(account_id)
               if isinstance(e, BillingAccount.LedgerEntryPosted)]
    charges = [e for e in entries if e.entry_type == "usage_charge"]
    assert charges and all(e.reference_type == "rated_usage_line" for e in charges)
    assert {e.reference_id for e in charges} <= {line["id"] for line in lines}
    assert -sum(e.amount_minor for e in charges) == cost
    assert sum(e.amount_minor for e in entries) == FUNDS - cost
    assert verify_chain(account_id, [entry_record(e) for e in entries]) == []
    assert stores.app.billing_account(user).balances == {"USD": FUNDS - cost}
    # and the read model (written by the projector process) holds the same chain
    with stores.query_pool.connection() as conn:
        rows = conn.execute("SELECT * FROM readmodels.ledger_entries WHERE account_id = %s"
                            " ORDER BY seq", (account_id,)).fetchall()
    assert [r["entry_hash"] for r in rows] == [e.entry_hash for e in entries]
    assert verify_chain(account_id, [{**r, "occurred_at": r["occurred_at"].astimezone(timezone.utc)}
                                     for r in rows]) == []
    # the claim is free and the quota slot given back
    assert stores.app.get_or_none(uuid.UUID(node_id)).live_claims() == []
    assert stores.app.get_or_none(quota_id_for(user)).live == []
    assert stores.app.get_or_none(uuid.UUID(allocation_id)).status == "released"
