"""The HTTP edge: FastAPI app, auth, error envelope, idempotency gate, read-model cache.

``api/commands`` routers call the domain (``domain.app.Ledgercore``) and never read
read-model tables; ``api/queries`` routers read only read-model tables (through the
cache) and never load aggregates.

May import: ``domain`` (commands), ``projections`` (queries) and ``infra`` (settings,
pools). Nothing imports ``api`` except ``infra.cli`` and the tests.
"""
