"""Allocation admissions through HTTP: ``submitV3ComputeLaunch`` per second.

Against ample capacity: a baremetal SKU with twice as many nodes as one level
admits, and funded users (a launch needs a positive balance), all set up in process
before the server starts (``prepare``). The server (``infra.cli run``, direct
transport) first takes a warm-up that fills every node (so each node's aggregate is in
its cache, as in a long-running server), which must then refuse one launch more
(``sku_unavailable``); everything is released. Then at each client concurrency the
load generator (``bench.loadgen``, kind ``launch``) sends a fixed number of launches,
each as the next user in turn (one lease per user per level, far below the
concurrency cap), while ``PositionPoller`` measures the lag of the allocations read
model; then the load generator releases every admitted lease (kind ``release``: a
lease whose provision task no agent picked up is released at once, without node work).

``check`` is this phase's integrity check (the bench refuses figures if it fails): the
whole notification log is decoded, and every acknowledged launch must be exactly one
``AllocationRequested`` carrying its ``X-Request-Id`` as correlation id, no refused
one may appear, unanswered ones are resolved (applied once or not at all), and no lease
may carry an id nobody sent; folding the claim events in log order, no node ever held
two live claims and no user more live leases than the cap; at the end every lease is
``released`` (once), no node holds a live claim, every quota is empty, every balance
is what it was funded with (a lease never active is never billed); the read models
(allocations, quotas, balances) agree, and so does the allocations read model rebuilt
from the log.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from bench.placement import _ctx, _render
from infra.db import Stores
from infra.settings import Settings

#: what each user is credited with before anything is timed (minor units)
FUNDS = 1_000_000
MAX_LISTED = 25


def lag_projection() -> str:
    """The read model whose lag is measured: ``allocations`` when registered (else the
    ``inventory`` read model, which holds the claims and the quotas)."""
    import projections

    return "allocations" if "allocations" in projections.BY_NAME else "inventory"


def _wait_all(futures: list[Future[Any]], what: str) -> list[dict[str, Any]]:
    answers = [future.result().response for future in futures]
    wrong = [a for a in answers if a["status"] not in (200, 201)]
    if wrong:
        raise RuntimeError(f"{what} failed: {wrong[0]}")
    return answers


def prepare(settings: Settings, *, nodes: int, users: int,
            tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """In process, before the server starts: the SKU, ``nodes`` nodes, ``users``
    funded users (each with a project). Submitted in chunks to the batch writer."""
    from domain.billing import adjust_balance
    from domain.money import Money
    from domain.nodes import register_node
    from domain.skus import create_sku, set_sku_active

    sku = f"adm-{uuid.uuid4().hex[:6]}"
    spec = {"vendor": "nvidia", "display_name": "bench node", "resource_class": "gpu_baremetal",
            "billing_unit": "node_hour", "scheduling_unit": "node",
            "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
            "unit_price": {"amount_minor": 1000, "currency": "USD"}}
    stores = Stores.open(settings)
    try:
        stores.app.start_batching()
        _wait_all([stores.app.submit(create_sku(_ctx(), sku=sku, spec=spec, render=_render))], "SKU")
        _wait_all([stores.app.submit(set_sku_active(_ctx(), sku=sku, active=True, render=_render))],
                  "SKU activation")
        node_ids: list[str] = []
        for start in range(0, nodes, 200):
            futures = []
            for i in range(start, min(nodes, start + 200)):
                identity = {"host": f"adm-{sku}-{i}", "hostname": None, "port": 22,
                            "ssh_username": "ubuntu", "sku": sku, "gpus_total": 8,
                            "region_code": "bench-1", "onboarding_mode": "manual"}
                futures.append(stores.app.submit(register_node(
                    _ctx(), identity=identity, online=True,
                    render=lambda r: _render(r) if not isinstance(r, dict) else
                    {"status": 201, "body": {"id": r["node"].node_id}})))
            node_ids += [a["body"]["id"] for a in _wait_all(futures, "node registration")]
            if tick:
                tick(len(node_ids))
        people = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(users)]
        for start in range(0, users, 500):
            _wait_all([stores.app.submit(adjust_balance(
                _ctx(), user_id=uuid.UUID(user), direction="credit", amount=Money(FUNDS, "USD"),
                reason="bench funds", render=_render)) for user, _ in people[start:start + 500]],
                "funding")
            if tick:
                tick(nodes + min(users, start + 500))
        stores.app.stop_batching()
    finally:
        stores.close()
    return {"sku": sku, "node_ids": node_ids, "users": [list(p) for p in people]}


# ---- integrity ------------------------------------------------------------------------------
class Expectations:
    """What the load generator recorded for launches and releases, over all runs."""

    def __init__(self) -> None:
        self.launched: dict[str, str] = {}  # request id -> allocation id
        self.launch_user: dict[str, str] = {}  # request id -> user id
        self.launch_refused: dict[str, str] = {}  # request id -> status
        self.launch_unknown: set[str] = set()
        self.released: dict[str, str] = {}  # allocation id -> request id
        self.release_refused: list[list[Any]] = []
        self.release_unknown: list[dict[str, Any]] = []

    def add_launches(self, result: dict[str, Any], users: list[list[str]]) -> None:
        for request_id, user_index, allocation_id in result["leases"]:
            self.launched[request_id] = allocation_id
            self.launch_user[request_id] = users[user_index][0]
        for request_id, _, status in result["refused"]:
            self.launch_refused[request_id] = status
        self.launch_unknown |= {row["request_id"] for row in result["unknown"]}

    def add_releases(self, result: dict[str, Any]) -> None:
        for request_id, _, allocation_id in result["leases"]:
            self.released[allocation_id] = request_id
        self.release_refused += result["refused"]
        self.release_unknown += result["unknown"]


def check(stores: Stores, expect: Expectations, *, users: list[list[str]], node_ids: list[str],
          cap: int, label: str = "admissions",
          tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Every check in the module docstring, on ``stores``'s database (processes stopped,
    read models caught up); returns a summary with ``ok`` and ``problems``."""
    import projections
    from consumers.rebuild import rebuild
    from domain.allocations import Allocation, UserAllocationQuota, quota_id_for
    from domain.billing import account_id_for
    from domain.inventory import LIVE, NodeInventory

    problems: list[str] = []

    def problem(text: str) -> None:
        problems.append(f"[{label}] {text}")

    max_id = stores.app.recorder.max_notification_id() or 0
    recorder, mapper = stores.app.recorder, stores.app.mapper
    requested: dict[str, list[str]] = defaultdict(list)  # correlation id -> allocation ids
    released_by: dict[str, list[str]] = defaultdict(list)  # allocation id -> correlation ids
    live_claims: dict[str, set[str]] = defaultdict(set)  # node -> live claim ids
    live_leases: dict[str, set[str]] = defaultdict(set)  # quota id -> live allocation ids
    most_on_a_node = most_per_user = 0
    scanned, position = 0, 0
    while True:
        notifications = recorder.select_notifications(start=position, limit=1000,
                                                      inclusive_of_start=False)
        if not notifications:
            break
        for notification in notifications:
            event = mapper.to_domain_event(notification)
            scanned += 1
            if isinstance(event, Allocation.Created):
                requested[(event.provenance or {}).get("correlation_id")].append(
                    str(event.originator_id))
            elif isinstance(event, Allocation.Moved) and event.to == "released":
                released_by[str(event.originator_id)].append(
                    (event.provenance or {}).get("correlation_id"))
            elif isinstance(event, NodeInventory.ClaimsReserved):
                node = live_claims[str(event.originator_id)]
                node |= {c["id"] for c in event.claims if c["status"] in LIVE}
                most_on_a_node = max(most_on_a_node, len(node))
            elif isinstance(event, NodeInventory.ClaimsMoved) and event.to not in LIVE:
                live_claims[str(event.originator_id)] -= set(event.claim_ids)
            elif isinstance(event, UserAllocationQuota.Admitted):
                quota = live_leases[str(event.originator_id)]
                quota.add(event.allocation_id)
                most_per_user = max(most_per_user, len(quota))
            elif isinstance(event, UserAllocationQuota.Retired):
                live_leases[str(event.originator_id)].discard(event.allocation_id)
        position = notifications[-1].id
        if tick:
            tick(position)
    if most_on_a_node > 1:
        problem(f"a node held {most_on_a_node} live claims at once")
    if most_per_user > cap:
        problem(f"a user held {most_per_user} live leases at once (cap {cap})")

    # the launches: acknowledged exactly once, refused never, unanswered resolved
    resolved: Counter[str] = Counter()
    for request_id, allocation_id in expect.launched.items():
        found = requested.get(request_id, [])
        if found != [allocation_id]:
            problem(f"acknowledged launch {request_id} ({allocation_id}) is in the store as {found}")
    for request_id, status in expect.launch_refused.items():
        if requested.get(request_id):
            problem(f"refused launch {request_id} ({status}) was applied")
    for request_id in expect.launch_unknown:
        count = len(requested.get(request_id, []))
        resolved["applied" if count == 1 else "not applied"] += 1
        if count > 1:
            problem(f"unanswered launch {request_id} applied {count} times")
    sent = set(expect.launched) | set(expect.launch_refused) | expect.launch_unknown
    stray = [rid for rid in requested if rid not in sent]
    for rid in stray[:MAX_LISTED]:
        problem(f"{len(requested[rid])} leases with correlation id {rid!r} nobody sent")
    allocation_ids = [a for ids in requested.values() for a in ids]

    # the end state: every lease released once, by its acknowledged release
    for allocation_id in allocation_ids:
        ends = released_by.get(allocation_id, [])
        if len(ends) != 1:
            problem(f"lease {allocation_id} released {len(ends)} times")
        elif allocation_id in expect.released and ends[0] != expect.released[allocation_id]:
            problem(f"lease {allocation_id} released by {ends[0]}, not by its acknowledged release")
    leases = {a: stores.app.get_or_none(uuid.UUID(a)) for a in allocation_ids}
    for allocation_id, lease in leases.items():
        if lease is None or lease.status != "released":
            problem(f"lease {allocation_id} is {lease.status if lease else 'missing'}, not released")
    for node_id in node_ids:
        node = stores.app.get_or_none(uuid.UUID(node_id))
        if node.live_claims() or live_claims.get(node_id):
            problem(f"node {node_id} still holds a live claim")
        foreign = {c["allocation_id"] for c in node.claims.values()} - set(leases)
        if foreign:
            problem(f"node {node_id} has claims of unknown leases {sorted(foreign)[:3]}")
    for user, _ in users:
        quota = stores.app.get_or_none(quota_id_for(user))
        if quota is not None and quota.live:
            problem(f"user {user}: quota still counts {len(quota.live)} leases")
        account = stores.app.get_or_none(account_id_for(uuid.UUID(user)))
        if account is None or account.balances != {"USD": FUNDS}:
            problem(f"user {user}: balance {account.balances if account else None}, funded {FUNDS}")

    # the read models agree, and so does the allocations read model rebuilt from the log
    def read_models() -> tuple[dict[str, str], int, int, dict[str, int]]:
        with stores.query_pool.connection() as conn:
            rows = {}
            if "allocations" in projections.BY_NAME:
                rows = {str(r["id"]): r["status"] for r in conn.execute(
                    "SELECT id, status FROM readmodels.allocations")}
            items = (conn.execute("SELECT count(*) AS n FROM readmodels.allocation_timeline")
                     .fetchone()["n"] if "allocations" in projections.BY_NAME else 0)
            live = conn.execute("SELECT coalesce(sum(live), 0) AS n FROM readmodels.allocation_quotas"
                                ).fetchone()["n"]
            balances = {str(r["owner_user_id"]): int(r["amount_minor"]) for r in conn.execute(
                "SELECT owner_user_id, amount_minor FROM readmodels.balances WHERE currency = 'USD'")}
        return rows, int(items), int(live), balances

    rows, items, live, balances = read_models()
    if "allocations" in projections.BY_NAME:
        if rows != {a: "released" for a in allocation_ids}:
            wrong = [a for a in set(rows) | set(allocation_ids) if rows.get(a) != "released"]
            problem(f"allocations read model: {len(wrong)} leases missing or not released, "
                    f"e.g. {wrong[:3]}")
    if live != 0:
        problem(f"quota read model still counts {live} live leases")
    wrong_balances = [u for u, _ in users if balances.get(u) != FUNDS]
    if wrong_balances:
        problem(f"balance read model differs for {len(wrong_balances)} users, e.g. {wrong_balances[:3]}")
    rebuilt_events = None
    if "allocations" in projections.BY_NAME:
        rebuilt_events = rebuild(stores.app, stores.read_models, projections.BY_NAME["allocations"])
        again, again_items, _, _ = read_models()
        if (again, again_items) != (rows, items):
            problem(f"rebuilt allocations read model differs: {len(again)} rows / {again_items} "
                    f"timeline items, live {len(rows)} / {items}")
    if expect.release_refused:
        problem(f"{len(expect.release_refused)} releases refused, e.g. {expect.release_refused[:3]}")
    resolved["releases unanswered"] = len(expect.release_unknown)
    return {
        "label": label, "ok": not problems, "users": len(users), "nodes": len(node_ids),
        "acknowledged_commands": len(expect.launched) + len(expect.released),
        "acknowledged_launches": len(expect.launched),
        "acknowledged_releases": len(expect.released),
        "refused_commands": len(expect.launch_refused) + len(expect.release_refused),
        "unanswered_commands": len(expect.launch_unknown) + len(expect.release_unknown),
        "unanswered_resolved": dict(resolved), "leases_in_store": len(allocation_ids),
        "most_live_claims_on_a_node": most_on_a_node, "most_live_leases_of_a_user": most_per_user,
        "events_scanned": scanned, "max_notification_id": max_id,
        "rebuilt_events": rebuilt_events,
        "problems": problems[:MAX_LISTED], "problem_count": len(problems),
    }
