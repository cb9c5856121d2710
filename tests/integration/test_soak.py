"""A soak with invariants: many concurrent clients send mixed commands for a bounded
time (``LEDGERCORE_SOAK_SECONDS``, default 8; minutes in the long mode) through HTTP:
credits, debits that would often overdraw, compute launches racing for a few nodes
under a per-user cap, releases, balance queries; node agents provision and release
the leases as they are asked. Then the global invariants: no balance below zero (debits
that would overdraw are refused), no node held by two live leases and no more live
leases than nodes or than the cap, every acknowledged adjustment in the event store
exactly once, balances equal to the ledger sums and the read models, every read model
equal to a replay and every hash chain verified. The numbers it prints are the ones
in docs/reliability.md ("Soak")."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import httpx

from api.auth import mint_token
from tests.conftest import serve_own_database
from tests.faults import (Adjustment, AdjustLoad, assert_exactly_once, audited, env_number,
                          read_model_balances, wait_caught_up)
from tests.harness import bearer, client
from tests.integration.test_allocation_race import (RELEASE, RESULT, WAIT, Caller, set_policy,
                                                    store_facts)
from tests.integration.test_inventory_commands import baremetal_sku, make_node, make_sku

SECONDS = env_number("LEDGERCORE_SOAK_SECONDS", 8)
CLIENTS = int(env_number("LEDGERCORE_SOAK_CLIENTS", 12))
NODES = int(env_number("LEDGERCORE_SOAK_NODES", 4))
CAP = 2
BALANCE = "/api/v1/billing/balance"


class Client:
    """One user's client: a random mix of commands on its own keep-alive connection."""

    def __init__(self, caller: Caller, admin: str, sku: str, load: AdjustLoad, seed: int):
        self.caller, self.admin, self.sku, self.load = caller, admin, sku, load
        self.random = random.Random(seed)
        self.live: list[str] = []
        self.statuses: Counter[str] = Counter()

    def step(self, http: httpx.Client) -> None:
        roll = self.random.random()
        if roll < 0.45:
            debit = roll < 0.2
            command = Adjustment(self.caller.user, "debit" if debit else "credit",
                                 self.random.randint(1, 3000 if debit else 1500))
            with self.load._lock:
                self.load.sent.append(command)
            command.send(http, self.admin)
            self.statuses[f"adjust {command.direction} {command.first}"] += 1
        elif roll < 0.7:
            response = self.caller.launch(self.sku)(http)
            code = response.json().get("code", "") if response.status_code >= 400 else ""
            self.statuses[f"launch {response.status_code} {code}".strip()] += 1
            if response.status_code == 202:
                self.live.append(response.json()["workload_id"])
        elif roll < 0.9 and self.live:
            lease = self.live.pop(self.random.randrange(len(self.live)))
            response = http.post(RELEASE.format(allocation_id=lease), headers=self.caller.headers())
            code = response.json().get("code", "") if response.status_code >= 400 else ""
            self.statuses[f"release {response.status_code} {code}".strip()] += 1
        else:
            response = http.get(BALANCE, headers=self.caller.headers(key=False))
            self.statuses[f"balance {response.status_code}"] += 1

    def run(self, url: str, until: float) -> None:
        with client(url) as http:
            while time.monotonic() < until:
                try:
                    self.step(http)
                except httpx.HTTPError as error:
                    self.statuses[f"transport {type(error).__name__}"] += 1


def agent(url: str, secret: str, node_id: str, stop: threading.Event, done: Counter[str]) -> None:
    """The node agent: take each task and report it done."""
    headers = bearer(mint_token(secret, user_id=node_id, actor_type="node"))
    with client(url) as http:
        while not stop.is_set():
            try:
                task = http.get(WAIT.format(node_id=node_id), headers=headers)
                if task.status_code != 200:
                    continue
                body = task.json()
                result = http.post(RESULT.format(node_id=node_id, task_id=body["task_id"]),
                                   headers=headers, json={
                                       "status": "success", "output": {},
                                       "completed_at": datetime.now(timezone.utc).isoformat()})
                done[f"{body['params']['phase']} {result.status_code}"] += 1
            except httpx.HTTPError:
                time.sleep(0.1)


def test_soak_mixed_commands_hold_every_invariant(services: Any, tokens: Any) -> None:
    admin, sku = tokens.admin(), f"soak-{uuid.uuid4().hex[:6]}"
    callers = [Caller(tokens) for _ in range(CLIENTS)]
    with serve_own_database(services, node_wait_seconds=0.5) as served:
        stores = served.stores
        load = AdjustLoad(served.url, admin, [c.user for c in callers])
        with client(served.url) as http:
            set_policy(http, admin, CAP)
            make_sku(http, admin, baremetal_sku(sku))
            nodes = [make_node(http, admin, sku)["id"] for _ in range(NODES)]
        for caller in callers:  # funded through the load, so the funding counts too
            command = Adjustment(caller.user, "credit", 2000)
            load.sent.append(command)
            with client(served.url) as http:
                assert command.send(http, admin) == "acked"

        clients = [Client(c, admin, sku, load, seed=i) for i, c in enumerate(callers)]
        stop, tasks = threading.Event(), Counter()
        agents = [threading.Thread(target=agent, args=(served.url, tokens.secret, n, stop, tasks))
                  for n in nodes]
        started = time.monotonic()
        until = started + SECONDS
        threads = [threading.Thread(target=c.run, args=(served.url, until)) for c in clients]
        for thread in agents + threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=SECONDS + 120)
        elapsed = time.monotonic() - started
        time.sleep(2)  # the agents finish the tasks already issued
        stop.set()
        for thread in agents:
            thread.join(timeout=30)

        statuses: Counter[str] = sum((c.statuses for c in clients), Counter())
        errors = {k: n for k, n in statuses.items() if " 5" in k or k.startswith("transport")}
        retries = load.settle()
        assert not errors, f"server errors or no answers: {errors}"

        # no overdraft where it is forbidden: no adjustment left a balance below zero
        # (assert_exactly_once, below), the debits that would have were refused
        users = {str(c.user) for c in callers}
        balances = {c.user: stores.app.billing_account(c.user).balances.get("USD", 0)
                    for c in callers}
        assert any(k.startswith("adjust debit 400") for k in statuses), "no debit was refused"
        # no node double-booked; live leases within the nodes and the cap; quota = leases
        live = store_facts(stores, users, nodes, CAP)
        for caller in callers:
            assert set(clients[callers.index(caller)].live) <= live[str(caller.user)]
        # every acknowledged adjustment exactly once; balances = ledger = read models
        found = assert_exactly_once(stores, load)
        caught_up = wait_caught_up(stores)
        read_balances, sums = read_model_balances(stores)
        assert {c.user: read_balances.get(c.user, 0) for c in callers} == balances
        assert {c.user: sums.get(c.user, 0) for c in callers} == balances
        verified = audited(stores)

    commands = sum(n for k, n in statuses.items() if not k.startswith("balance"))
    print("\n[reliability] soak: " + json.dumps({
        "seconds": round(elapsed, 1), "clients": CLIENTS, "nodes": NODES, "cap": CAP,
        "commands": commands, "commands_per_s": round(commands / elapsed, 1),
        "queries": sum(n for k, n in statuses.items() if k.startswith("balance")),
        "statuses": dict(sorted(statuses.items())), "node_tasks": dict(tasks),
        "live_leases_at_end": sum(len(v) for v in live.values()), "retries": retries,
        "lowest_balance": min(balances.values()),
        **found, "read_models_caught_up_s": round(caught_up, 2),
        "events_verified": verified.events, "ledger_entries_verified": verified.entries,
        "accounts_verified": verified.accounts}, sort_keys=True))
