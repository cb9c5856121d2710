"""The benchmark suite (``./scripts/bench``, ``python -m bench``).

Measures ledgercore (command throughput and latency, events appended, projection lag
on both transports, replay and rebuild rates, query latency, peak memory) beside
references taken in the same run on the same machine (plain psycopg inserts, an
empty FastAPI handler on the same HTTP stack, the Kafka-protocol broker, the
eventsourcing library used naively), and refuses to report unless every acknowledged
command is found exactly once in the event store, the aggregates, the read model and
a rebuild of it. See ``bench/README.md``.

May import everything (``domain``, ``projections``, ``consumers``, ``api``, ``infra``);
nothing imports ``bench``. It drives ledgercore as an operator would: over HTTP, the
CLI, and ``infra.settings.Settings``, ``infra.db.Stores``, ``consumers.direct.catch_up``,
``consumers.rebuild.rebuild`` and ``projections.BY_NAME``.
"""
