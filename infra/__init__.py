"""Settings, connection pools and the services ledgercore runs on (Postgres, the
broker, Redis), shared by ``api``, ``consumers`` and ``scripts``.

May import: ``domain``, ``projections``, ``consumers``, ``api`` (it wires them
together) and third-party libraries. ``domain`` and ``projections`` never import it.
"""
