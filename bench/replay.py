"""Replay and rebuild rates on a large history.

The history is appended in-process by worker processes (two: the machine has two
cores), each with its own ``Stores.open(settings)``, saving one ``BillingAccount`` at a
time with ``events_per_account`` events (opening, then credits and covered debits) in
one ``app.save``. Each worker writes what every account's balance must be. The workers
decide their accounts in rounds and save each round together, so the append path
(``app.save``: transcoding, the insert, the commit) is also timed on its own: the
in-process append rate.

Then, on the same database: ``consumers.direct.catch_up`` (the direct transport's
incremental path, batches of 500 per transaction) timed over the first
``catch_up_events`` events, and ``consumers.rebuild.rebuild`` of ``billing_ledger``
(one transaction) timed over the whole history. The rebuilt balances are checked
against what the workers wrote.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from psycopg.sql import SQL, Identifier

from infra.settings import Settings

#: accounts (of ``per_account`` events each) a worker decides before each round of saves
CHUNK_ACCOUNTS = 100
PROVENANCE = {"actor_id": "00000000-0000-4000-8000-00000000be9c", "actor_type": "user",
              "actor_role": "admin", "source": "bench", "correlation_id": None,
              "causation_id": None}


def _generate(settings: Settings, events: int, per_account: int, seed: int, out: str,
              counter: Any, barrier: Any, saving: Any, rounds: int) -> None:
    """Worker: append about ``events`` events; write {user: balance} to ``out``.

    In ``rounds`` rounds of ``CHUNK_ACCOUNTS`` accounts: decide them (their events pending in
    memory), wait for the other workers, save them one ``app.save`` (one transaction)
    per account, wait again. The first worker adds each round's save window (from the
    first wait to the second) to ``saving``: the in-process append rate is the events
    over those windows, every worker appending at once."""
    from domain.billing import BillingAccount
    from domain.money import Money
    from infra.db import Stores

    rng = random.Random(seed)
    stores = Stores.open(settings)
    balances: dict[str, int] = {}
    done = 0
    try:
        for _ in range(rounds):
            accounts = []
            while done < events and len(accounts) < CHUNK_ACCOUNTS:
                user = uuid.UUID(int=rng.getrandbits(128), version=4)
                now = datetime.now(timezone.utc)
                size = min(per_account, events - done)
                account = BillingAccount.open(user, "USD", PROVENANCE, now)
                balance = 0
                for _ in range(size - 1):
                    if balance >= 100 and rng.random() < 0.3:
                        direction, amount = "debit", rng.randint(1, min(balance, 5000))
                    else:
                        direction, amount = "credit", rng.randint(100, 10_000)
                    account.adjust(direction=direction, amount=Money(amount, "USD"),
                                   reason="bench",
                                   adjustment_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                                   provenance=PROVENANCE, at=now)
                    balance += amount if direction == "credit" else -amount
                accounts.append((account, size))
                balances[str(user)] = balance
                done += size
            # every worker takes part in every round (an empty one when it is done)
            index = barrier.wait()
            started = time.monotonic()
            for account, size in accounts:
                stores.app.save(account)
                with counter.get_lock():
                    counter.value += size
            barrier.wait()
            if index == 0:
                with saving.get_lock():
                    saving.value += time.monotonic() - started
    finally:
        stores.close()
    Path(out).write_text(json.dumps(balances))


def generate(settings: Settings, events: int, workdir: Path, seed: int, workers: int = 2,
             per_account: int = 100, timeout: float = 1800,
             tick: Callable[[int], None] | None = None
             ) -> tuple[dict[str, int], float, float]:
    """Append ``events`` events with ``workers`` processes; return the expected balance
    of every account created, the seconds it took, and the seconds spent saving (every
    worker saving at once; see ``_generate``)."""
    context = mp.get_context("spawn")
    counter = context.Value("q", 0)
    saving = context.Value("d", 0.0)
    share = [events // workers + (1 if n < events % workers else 0) for n in range(workers)]
    share = [n for n in share if n]
    rounds = -(-max(share) // (CHUNK_ACCOUNTS * per_account))
    barrier = context.Barrier(len(share), timeout=timeout)
    outs = [str(workdir / f"history-{seed}-{n}.json") for n in range(len(share))]
    started = time.monotonic()
    processes = [context.Process(target=_generate, daemon=True,
                                 args=(settings, size, per_account, seed * 100 + n, outs[n], counter,
                                       barrier, saving, rounds))
                 for n, size in enumerate(share)]
    for process in processes:
        process.start()
    try:
        while any(p.is_alive() for p in processes):
            if tick is not None:
                tick(counter.value)
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"history generation took over {timeout:.0f}s")
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
    seconds = time.monotonic() - started
    if any(p.exitcode != 0 for p in processes):
        raise RuntimeError("a history generator failed: " + ", ".join(str(p.exitcode) for p in processes))
    expected: dict[str, int] = {}
    for out in outs:
        expected.update(json.loads(Path(out).read_text()))
    return expected, seconds, saving.value


def timed_catch_up(stores: Any) -> tuple[int, float]:
    from consumers.direct import catch_up

    started = time.monotonic()
    position = catch_up(stores.app, stores.read_models)
    return position, time.monotonic() - started


def timed_rebuild(stores: Any, progress: bool) -> tuple[int, float]:
    import projections
    from consumers.rebuild import rebuild

    started = time.monotonic()
    try:
        count = rebuild(stores.app, stores.read_models, projections.BY_NAME["billing_ledger"],
                        progress=progress)
    except TypeError:  # a signature without ``progress``
        count = rebuild(stores.app, stores.read_models, projections.BY_NAME["billing_ledger"])
    return count, time.monotonic() - started


def timed_audit_replay(stores: Any, tick: Callable[[int], None] | None = None
                       ) -> tuple[Any, float]:
    """``ledgercore replay --as-of now`` over the whole history (``infra.audit.replay``):
    the as-of position, then every account folded from its first event, by the replay's
    default worker processes (two on a history this long; their start is timed too)."""
    from infra.audit.replay import replay as audit_replay

    started = time.monotonic()
    state = audit_replay(stores.app, datetime.now(timezone.utc), tick=tick)
    return state, time.monotonic() - started


def read_model_balances(stores: Any) -> dict[str, int]:
    with stores.query_pool.connection() as conn:
        rows = conn.execute("SELECT owner_user_id, amount_minor FROM readmodels.balances"
                            " WHERE currency = 'USD'").fetchall()
    return {str(row["owner_user_id"]): int(row["amount_minor"]) for row in rows}


def events_table(stores: Any) -> Any:
    recorder = stores.app.recorder
    return SQL("{0}.{1}").format(Identifier(recorder.datastore.schema),
                                 Identifier(recorder.events_table_name))


def event_count(stores: Any) -> int:
    with stores.query_pool.connection() as conn:
        row = conn.execute(SQL("SELECT count(*) AS n FROM {0}").format(events_table(stores))).fetchone()
    return int(row["n"])


def event_bytes(stores: Any) -> float:
    """Mean size of a stored event's state (the first 10,000)."""
    with stores.query_pool.connection() as conn:
        row = conn.execute(SQL("SELECT avg(length(state)) AS b FROM (SELECT state FROM {0}"
                               " LIMIT 10000) s").format(events_table(stores))).fetchone()
    return float(row["b"] or 0)
