"""Placement claims per second under contention.

One or two writers (each a ``Stores`` with its own ``Ledgercore`` batch writer, as one
or two API processes would have) share one event store. A baremetal SKU has ``nodes`` nodes.
Each round, ``contenders`` threads split over the writers submit launches (the
path ``submitV3ComputeLaunch`` takes, minus HTTP) until every node is claimed, so most
of the round is spent racing for the last few units; then every claim is released.
Claims/s counts the admitted launches over the reserve phases only.

A launch needs a positive balance, so the launching users are a pool funded before
anything is timed: a contender launches as one user until that user wins a node,
then takes the next (each user holds one lease, far below the concurrency cap), as
when every launch came from a user of its own.

Afterwards it checks what must hold: every node carries at most one live claim, the
claim holders are exactly the admitted allocations, and a refused launch got
``sku_unavailable``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from domain.commands import Command
from domain.errors import DomainError
from domain.provenance import CommandContext, IdempotencyClaim
from infra.db import Stores
from infra.settings import Settings

ADMIN = "00000000-0000-4000-8000-00000000be9c"
#: what each pooled user is credited with before the timed rounds (minor units)
FUNDS = 1_000_000


def _render(result: dict[str, Any] | DomainError) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"status": 409 if result.kind == "conflict" else 400,
                "body": {"code": result.code, "message": result.message}}
    return {"status": 200, "body": result}


def _ctx(source: str = "admin", key: str | None = None) -> CommandContext:
    claim = IdempotencyClaim(scope=f"bench:{key}", fingerprint=key) if key else None
    return CommandContext(actor_id=ADMIN, actor_role="admin", source=source, idempotency=claim)


def _seed(stores: Stores, sku: str, nodes: int) -> list[str]:
    from domain.nodes import register_node
    from domain.skus import create_sku, set_sku_active

    spec = {"vendor": "nvidia", "display_name": "bench node", "resource_class": "gpu_baremetal",
            "billing_unit": "node_hour", "scheduling_unit": "node",
            "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
            "unit_price": {"amount_minor": 1000, "currency": "USD"}}
    stores.app.execute(create_sku(_ctx(), sku=sku, spec=spec, render=_render))
    stores.app.execute(set_sku_active(_ctx(), sku=sku, active=True, render=_render))
    ids = []
    for i in range(nodes):
        identity = {"host": f"bench-{sku}-{i}", "hostname": None, "port": 22, "ssh_username": "ubuntu",
                    "sku": sku, "gpus_total": 8, "region_code": "bench-1", "onboarding_mode": "manual"}
        outcome = stores.app.execute(register_node(
            _ctx(), identity=identity, online=True,
            render=lambda r: _render(r) if isinstance(r, DomainError) else
            {"status": 201, "body": {"id": r["node"].node_id}}))
        ids.append(outcome.response["body"]["id"])
    return ids


def fund_users(stores: Stores, count: int) -> list[uuid.UUID]:
    """``count`` new users, each credited ``FUNDS`` (one batch of concurrent commands)."""
    from domain.billing import adjust_balance
    from domain.money import Money

    users = [uuid.uuid4() for _ in range(count)]
    futures: list[Future[Any]] = [stores.app.submit(adjust_balance(
        _ctx(), user_id=user, direction="credit", amount=Money(FUNDS, "USD"), reason="bench funds",
        render=_render)) for user in users]
    for future in futures:
        status = future.result().response["status"]
        if status != 200:
            raise RuntimeError(f"funding a bench user failed: {future.result().response}")
    return users


def _launch(sku: str, user_id: uuid.UUID, project_id: uuid.UUID) -> Command:
    from domain.admission import submit_launch

    key = uuid.uuid4().hex
    return submit_launch(_ctx("api", key), user_id=user_id, tenant_id=None,
                         project_id=project_id, sku=sku, unit_count=1,
                         request={"sku": sku, "scheduler_type": "bare_metal"}, render=_render)


def _release_all(stores: Stores, node_ids: list[str]) -> None:
    from domain.commands import Session
    from domain.placement import release

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed = []
        for node_id in node_ids:
            node = session.get(uuid.UUID(node_id))
            for allocation_id in {c["allocation_id"] for c in node.live_claims()}:
                release(session, ctx, node_id=node_id, allocation_id=uuid.UUID(allocation_id))
            changed.append(node)
        return changed, {}

    stores.app.execute(Command(_ctx(), decide, _render))


def measure(settings: Settings, *, nodes: int, contenders: int, rounds: int, writers_count: int = 2,
            tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    writers = [Stores.open(settings) for _ in range(writers_count)]
    try:
        for stores in writers:
            stores.app.start_batching()
        sku = f"bench-{uuid.uuid4().hex[:6]}"
        node_ids = _seed(writers[0], sku, nodes)
        # a contender takes a user at the start of each round and after each win
        pool: Iterator[uuid.UUID] = iter(fund_users(writers[0], rounds * (nodes + contenders)))
        pool_lock = threading.Lock()

        def next_user() -> tuple[uuid.UUID, uuid.UUID]:
            with pool_lock:
                return next(pool), uuid.uuid4()

        admitted: list[str] = []
        refusals: dict[str, int] = {}
        reserve_seconds = 0.0
        problems: list[str] = []
        for round_ in range(rounds):
            stop = threading.Event()
            lock = threading.Lock()
            won: list[str] = []

            def contender(index: int) -> None:
                app = writers[index % len(writers)].app
                user, project = next_user()
                while not stop.is_set():
                    outcome = app.submit(_launch(sku, user, project)).result()
                    body = outcome.response["body"]
                    with lock:
                        if outcome.response["status"] == 200:
                            won.extend(a["id"] for a in body["allocations"])
                            if len(won) >= nodes:
                                stop.set()
                        else:
                            refusals[body["code"]] = refusals.get(body["code"], 0) + 1
                    if outcome.response["status"] == 200:
                        user, project = next_user()

            threads = [threading.Thread(target=contender, args=(i,)) for i in range(contenders)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            reserve_seconds += time.perf_counter() - started
            holders = []
            for node_id in node_ids:
                live = writers[0].app.get_or_none(uuid.UUID(node_id)).live_claims()
                if len(live) > 1:
                    problems.append(f"round {round_}: node {node_id} has {len(live)} live claims")
                holders += [c["allocation_id"] for c in live]
            if sorted(holders) != sorted(won):
                problems.append(f"round {round_}: {len(won)} admitted, {len(holders)} claims held")
            admitted += won
            _release_all(writers[0], node_ids)
            if tick:
                tick(round_ + 1)
        unexpected = {code: n for code, n in refusals.items() if code != "sku_unavailable"}
        if unexpected:
            problems.append(f"unexpected refusals: {unexpected}")
        return {"nodes": nodes, "contenders": contenders, "writers": len(writers), "rounds": rounds,
                "claims": len(admitted), "refused": sum(refusals.values()),
                "reserve_seconds": reserve_seconds,
                "claims_per_second": len(admitted) / reserve_seconds,
                "attempts_per_second": (len(admitted) + sum(refusals.values())) / reserve_seconds,
                "conflicted_batches": sum(w.app.conflicted_batches for w in writers),
                "batches": sum(w.app.batches for w in writers), "ok": not problems,
                "problems": problems}
    finally:
        for stores in writers:
            stores.app.stop_batching()
            stores.close()
