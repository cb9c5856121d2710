"""Financial restrictions read model: the posture callers and operators see."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.restrictions import FinancialRestriction, restriction_json, severity


class Restrictions:
    name = "restrictions"
    tables = ("financial_restrictions",)

    def ddl(self, schema: str) -> list[str]:
        return [
            f'CREATE TABLE IF NOT EXISTS "{schema}".financial_restrictions ('
            " id uuid PRIMARY KEY, scope_type text NOT NULL, scope_id uuid NOT NULL,"
            " state text NOT NULL, reason text NOT NULL, effects jsonb NOT NULL,"
            " correlation_id text NOT NULL, updated_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL, UNIQUE (scope_type, scope_id))",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        if not isinstance(event, FinancialRestriction.Set):
            return
        cur.execute(SQL(
            "INSERT INTO {0}.financial_restrictions VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, reason = EXCLUDED.reason,"
            " effects = EXCLUDED.effects, correlation_id = EXCLUDED.correlation_id,"
            " updated_at = EXCLUDED.updated_at, notification_id = EXCLUDED.notification_id"
        ).format(Identifier(schema)), (
            event.originator_id, event.scope_type, event.scope_id, event.state, event.reason,
            Jsonb(event.effects), event.provenance.get("correlation_id") or "", event.timestamp,
            notification_id))


def caller_restrictions(cur: Cursor[Any], schema: str, scopes: list[tuple[str, UUID]]
                        ) -> dict[str, Any] | None:
    """The most severe restriction over ``scopes``, as the contract's JSON, or None."""
    if not scopes:
        return None
    cur.execute(SQL("SELECT * FROM {0}.financial_restrictions WHERE (scope_type, scope_id)"
                    " IN (SELECT * FROM unnest(%s::text[], %s::uuid[]))").format(Identifier(schema)),
                ([t for t, _ in scopes], [i for _, i in scopes]))
    rows = cur.fetchall()
    if not rows:
        return None
    worst = max(rows, key=lambda r: (severity(r["state"]), r["updated_at"]))
    return restriction_json(worst)
