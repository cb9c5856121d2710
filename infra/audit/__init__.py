"""The auditors' tools behind ``./scripts/ledgercore replay|verify|export``: prove every
balance from the event store alone, without trusting the running service.

- ``log``: reading the notification log (``read_log``) and what "as of an instant"
  means (``as_of_position``, ``parse_instant``); ``progress`` bars on a terminal.
- ``replay``: balances, usage records and open placement claims as they stood at an
  instant, folded from the log.
- ``export``: ledger entries with their events and each account's chain, streamed as
  NDJSON or CSV (``format`` holds the record shapes and the CSV columns).
- ``chain``: one account's hash chain checked entry by entry (pure).
- ``offline``: ``verify --offline FILE``: an export proved without a database (pure).
- ``verify``: every read model rebuilt from the log into a scratch schema and compared
  with the live tables, every account's chain and every stored snapshot checked.

**As of an instant.** Events carry the ``timestamp`` their command decided at
(``CommandContext.now``). Log order (the notification id) is commit order: the event
store takes a table lock to assign ids, so every prefix of the log is a state that
existed. Timestamps are not monotonic in log order: two writers decide at t1 < t2 and
the second commits first, and a command retried after a lost race keeps its original
``now``. So the state *as of T* is the log prefix up to the last event (of any kind)
whose timestamp is at or before T: ``as_of_position(app, T)``. Every event stamped at
or before T is in that prefix; so is an event stamped after T that committed before
one of them (the store already held it by then). Nothing else is.
The replay, the export's ``--from``/``--to`` and the tests all use this one definition.
"""
