"""Transports that carry events from the event store to the read models.

``direct`` follows the notification log; ``relay`` publishes the log to Kafka and
``kafka_projector`` consumes it in a group. Both feed the same
``projections.store.ReadModelStore.apply_batch``: the transport is configuration.

May import: ``domain``, ``projections``, ``eventsourcing``, ``psycopg`` and
``kafka-python``. Never ``api`` or ``infra`` (which pass settings in as arguments).
"""
