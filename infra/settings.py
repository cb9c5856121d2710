"""All configuration: environment variables with the ``LEDGERCORE_`` prefix.

The README lists every variable. Nothing else in the code reads the environment.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

PREFIX = "LEDGERCORE_"


def _get(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(PREFIX + name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    pg_dsn: str | None = None
    redis_url: str | None = None
    kafka_bootstrap: str | None = None
    transport: str = "direct"
    kafka_topic: str = "ledgercore.events"
    kafka_partitions: int = 3
    kafka_group: str = "ledgercore-projectors"
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".data")
    jwt_secret: str = ""
    #: the secret was generated under the data dir (development), not configured
    jwt_secret_is_dev: bool = False
    default_currency: str = "USD"
    #: signing secret of payment-provider webhooks (Stripe-Signature scheme)
    webhook_secret: str = ""
    #: where the local checkout provider points payers
    checkout_base_url: str = "https://checkout.invalid/pay"
    max_body_bytes: int = 64 * 1024
    read_wait_seconds: float = 5.0
    #: how long a node agent's task long-poll waits before answering 204
    node_wait_seconds: float = 20.0
    cache_ttl_seconds: int = 300
    pg_pool_size: int = 8
    redis_prefix: str = "lc"
    run_projector: bool = True
    #: how much the direct projector's process lowers its CPU priority (``nice``; 0 keeps
    #: it): on shared cores, commands are then served first and read models lag further
    projector_nice: int = 0
    #: serve the busiest commands through ``api.hot_routes`` (off: all through FastAPI)
    hot_routes: bool = True
    #: test-only fault injection: crash the relay/projector at a named point
    test_fault: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = Path(_get("DATA_DIR", ".data")).resolve()
        transport = _get("TRANSPORT", "direct")
        if transport not in ("direct", "kafka"):
            raise SystemExit(f"{PREFIX}TRANSPORT must be direct or kafka, not {transport!r}")
        return cls(
            pg_dsn=_get("PG_DSN"),
            redis_url=_get("REDIS_URL"),
            kafka_bootstrap=_get("KAFKA_BOOTSTRAP"),
            transport=transport,
            kafka_topic=_get("KAFKA_TOPIC", "ledgercore.events"),
            kafka_partitions=int(_get("KAFKA_PARTITIONS", "3")),
            kafka_group=_get("KAFKA_GROUP", "ledgercore-projectors"),
            host=_get("HOST", "127.0.0.1"),
            port=int(_get("PORT", "8000")),
            data_dir=data_dir,
            jwt_secret=_get("JWT_SECRET") or _persistent_secret(data_dir),
            jwt_secret_is_dev=_get("JWT_SECRET") is None,
            default_currency=_get("DEFAULT_CURRENCY", "USD"),
            webhook_secret=_get("WEBHOOK_SECRET") or _persistent_secret(data_dir, "webhook-secret"),
            checkout_base_url=_get("CHECKOUT_BASE_URL", "https://checkout.invalid/pay"),
            max_body_bytes=int(_get("MAX_BODY_BYTES", str(64 * 1024))),
            read_wait_seconds=float(_get("READ_WAIT_SECONDS", "5")),
            node_wait_seconds=float(_get("NODE_WAIT_SECONDS", "20")),
            cache_ttl_seconds=int(_get("CACHE_TTL_SECONDS", "300")),
            pg_pool_size=int(_get("PG_POOL_SIZE", "8")),
            redis_prefix=_get("REDIS_PREFIX", "lc"),
            run_projector=_get("RUN_PROJECTOR", "on") != "off",
            projector_nice=_nice(_get("PROJECTOR_NICE", "0")),
            hot_routes=_get("HOT_ROUTES", "on") != "off",
            test_fault=_get("TEST_FAULT"),
        )

    def eventstore_env(self) -> dict[str, str]:
        """The eventsourcing library's configuration for our event store."""
        if not self.pg_dsn:
            raise RuntimeError("no Postgres DSN: start the embedded one first")
        info = conninfo_to_dict(self.pg_dsn)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "APPLICATION_RECORDER_TOPIC": "infra.event_store:ArrayInsertRecorder",
            "POSTGRES_DBNAME": str(info.get("dbname", "postgres")),
            "POSTGRES_HOST": str(info.get("host", "127.0.0.1")),
            "POSTGRES_PORT": str(info.get("port", "5432")),
            "POSTGRES_USER": str(info.get("user", "postgres")),
            "POSTGRES_PASSWORD": str(info.get("password", "")),
            "POSTGRES_SCHEMA": "eventstore",
            "POSTGRES_POOL_SIZE": str(self.pg_pool_size),
            "POSTGRES_MAX_OVERFLOW": str(self.pg_pool_size),
            "POSTGRES_CONN_MAX_AGE": "600",
            "POSTGRES_PRE_PING": "n",
            "POSTGRES_LOCK_TIMEOUT": "10",
            "CREATE_TABLE": "y",
        }


def _nice(text: str) -> int:
    if not text.isdigit() or int(text) > 19:
        raise SystemExit(f"{PREFIX}PROJECTOR_NICE must be an integer from 0 to 19, not {text!r}")
    return int(text)


def _persistent_secret(data_dir: Path, name: str = "jwt-secret") -> str:
    """A development secret, kept under the data dir so it survives restarts."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    return secret
