"""One account's hash chain, checked entry by entry as the entries come (pure).

``Chain`` holds what a segment of an account's chain must continue from (the sequence
number, the previous ``entry_hash``, the running balance per currency) and checks each
entry handed to it (``feed``), then the segment's end (``close``). It recomputes
every hash with the ledger's own rule (``billing.entry_body`` and
``canonical.ledger_entry_hash``) from the entry's fields alone, so it needs no
database: ``verify`` feeds it the entries of the event store, ``verify --offline``
those of an export file.

Each problem is a ``Finding`` naming the entry it concerns (``entry_id``, ``seq``, and
where it was: ``line`` in a file, ``position`` in the log). Problems:

- ``malformed``: a field is missing or of the wrong type;
- ``tampered``: ``entry_hash`` is not the hash of the entry's fields (a field changed);
- ``broken_link``: ``prev_hash`` is not the previous entry's ``entry_hash``. When the
  entry's own hash holds, the previous entry is named: it was changed (and re-hashed)
  after this one linked to it;
- ``wrong_entry_id``: the id is not the one the ledger derives from account and seq;
- ``unbalanced``: the legs do not sum to zero;
- ``bad_balance``: ``balance_after_minor`` is not the running balance;
- ``missing``: a sequence number never came (a deleted entry: named by the id the
  ledger derives for it);
- ``out_of_order``: an entry came after a later one of its account (reordered);
- ``duplicate``: a sequence number came twice (an inserted copy);
- ``inserted``: an entry beyond the segment's declared end;
- ``end_mismatch``: the segment's declared end (last seq, count, last hash, balances)
  is not where the entries lead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from domain.billing import NAMESPACE, entry_body
from domain.canonical import GENESIS_HASH, ledger_entry_hash

#: a gap longer than this is reported as one range, not one finding per entry
MAX_LISTED_GAP = 1000


@dataclass
class Finding:
    problem: str
    detail: str
    account_id: str | None = None
    entry_id: str | None = None
    seq: int | None = None
    line: int | None = None
    position: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.position is not None:
            where.append(f"position {self.position}")
        if self.account_id is not None:
            where.append(f"account {self.account_id}")
        if self.entry_id is not None:
            where.append(f"entry {self.entry_id}" + (f" (seq {self.seq})" if self.seq else ""))
        return f"{self.problem}: {self.detail}" + (f" [{', '.join(where)}]" if where else "")


def entry_id_for(account_id: str, seq: int) -> str:
    """The id the ledger gives entry ``seq`` of an account (``BillingAccount._post``)."""
    return str(uuid5(NAMESPACE, f"entry:{UUID(account_id)}:{seq}"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shape_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with the entry's fields' types, or None."""
    for field in ("seq", "amount_minor", "balance_after_minor"):
        if not _is_int(entry.get(field)):
            return f"{field} is not an integer"
    for field in ("entry_id", "entry_type", "currency", "occurred_at", "prev_hash",
                  "entry_hash"):
        if not isinstance(entry.get(field), str):
            return f"{field} is missing or not text"
    for field in ("reference_type", "reference_id", "correlation_id"):
        if entry.get(field) is not None and not isinstance(entry[field], str):
            return f"{field} is not text"
    legs = entry.get("legs")
    if not isinstance(legs, list) or not all(
            isinstance(leg, dict) and isinstance(leg.get("account"), str)
            and _is_int(leg.get("amount_minor")) and set(leg) == {"account", "amount_minor"}
            for leg in legs):
        return "legs are not a list of {account, amount_minor}"
    try:
        datetime.fromisoformat(entry["occurred_at"])
    except ValueError:
        return "occurred_at is not an ISO-8601 instant"
    return None


def entry_hash_of(account_id: str, entry: dict[str, Any]) -> str:
    """The hash the ledger gives ``entry`` (fields as exported) after its ``prev_hash``."""
    body = entry_body(account_id=account_id, entry_id=entry["entry_id"], seq=entry["seq"],
                      entry_type=entry["entry_type"], amount_minor=entry["amount_minor"],
                      currency=entry["currency"], reference_type=entry["reference_type"],
                      reference_id=entry["reference_id"], legs=entry["legs"],
                      balance_after_minor=entry["balance_after_minor"],
                      occurred_at=datetime.fromisoformat(entry["occurred_at"]),
                      correlation_id=entry["correlation_id"])
    return ledger_entry_hash(body, entry["prev_hash"])


class Chain:
    """One account's chain segment from ``first_seq`` (``start_hash`` and
    ``start_balances`` are where the entry before it left the chain)."""

    def __init__(self, account_id: str, first_seq: int = 1, start_hash: str = GENESIS_HASH,
                 start_balances: dict[str, int] | None = None):
        self.account_id = account_id
        self.first_seq = first_seq
        self.start_hash = start_hash
        self.expected = first_seq
        self.prev_hash = start_hash
        self.prev_id: str | None = None
        self.balances = dict(start_balances or {})
        self.seen: set[int] = set()
        self.missing: dict[int, Finding] = {}
        self.count = 0
        self.last_hash = start_hash
        self.last_position = 0
        self.last_seq = first_seq - 1

    def _finding(self, problem: str, detail: str, entry: dict[str, Any] | None = None,
                 where: dict[str, Any] | None = None, **named: Any) -> Finding:
        fields: dict[str, Any] = {"account_id": self.account_id, **(where or {})}
        if entry is not None:
            fields.update(entry_id=entry.get("entry_id"),
                          seq=entry.get("seq") if _is_int(entry.get("seq")) else None)
        fields.update(named)
        return Finding(problem, detail, **fields)

    def feed(self, entry: dict[str, Any], line: int | None = None,
             position: int | None = None) -> list[Finding]:
        """Check the next entry of the segment (fields as in an export's ``entry``)."""
        where = {"line": line, "position": position}
        shape = shape_problem(entry)
        if shape is not None:
            return [self._finding("malformed", shape, entry, where)]
        seq, entry_id = entry["seq"], entry["entry_id"]
        found: list[Finding] = []
        if entry_id != entry_id_for(self.account_id, seq):
            found.append(self._finding("wrong_entry_id", f"entry {seq} of this account has id "
                                       f"{entry_id_for(self.account_id, seq)}", entry, where))
        try:
            intact = entry_hash_of(self.account_id, entry) == entry["entry_hash"]
        except (TypeError, ValueError) as error:  # e.g. a float where an integer belongs
            return found + [self._finding("malformed", str(error), entry, where)]
        if not intact:
            found.append(self._finding("tampered", "entry_hash is not the hash of the entry's "
                                       "fields: a field was changed", entry, where))
        if sum(leg["amount_minor"] for leg in entry["legs"]) != 0:
            found.append(self._finding("unbalanced", "the legs do not sum to zero", entry, where))
        if seq in self.seen:
            return found + [self._finding("duplicate", f"seq {seq} came before: an inserted "
                                          "copy", entry, where)]
        if seq < self.expected:
            if seq in self.missing:
                del self.missing[seq]
                detail = f"seq {seq} came after seq {self.expected - 1}: entries reordered"
                found.append(self._finding("out_of_order", detail, entry, where))
            else:
                found.append(self._finding("inserted", f"seq {seq} is before the segment's "
                                           f"first seq {self.first_seq}", entry, where))
            self.seen.add(seq)
            return found
        if position is not None and position <= self.last_position:
            found.append(self._finding("out_of_order", f"its event (position {position}) is not "
                                       f"after the previous entry's ({self.last_position})",
                                       entry, where))
        if seq > self.expected:
            self._gap(self.expected, seq, where)
        elif entry["prev_hash"] != self.prev_hash:
            if seq == self.first_seq:
                found.append(self._finding("broken_link", "prev_hash is not the segment's "
                                           "start_hash", entry, where))
            elif intact:
                found.append(self._finding(
                    "broken_link", f"entry {seq - 1} was changed after entry {seq} "
                    f"({entry_id}) linked to it: its entry_hash is not this entry's prev_hash",
                    None, where, entry_id=self.prev_id, seq=seq - 1))
            else:
                found.append(self._finding("broken_link", "prev_hash is not the previous "
                                           "entry's entry_hash", entry, where))
        currency = entry["currency"]
        running = self.balances.get(currency, 0) + entry["amount_minor"]
        if seq == self.expected and running != entry["balance_after_minor"]:
            found.append(self._finding("bad_balance", f"balance_after_minor "
                                       f"{entry['balance_after_minor']} is not the running "
                                       f"balance {running} {currency}", entry, where))
        self.balances[currency] = entry["balance_after_minor"]  # go on from what it says
        self.seen.add(seq)
        self.expected = seq + 1
        self.prev_hash = self.last_hash = entry["entry_hash"]
        self.prev_id = entry_id
        self.last_seq = seq
        self.count += 1
        if position is not None:
            self.last_position = position
        return found

    def _gap(self, start: int, stop: int, where: dict[str, Any]) -> None:
        """Sequence numbers ``start`` … ``stop - 1`` did not come (yet)."""
        if stop - start > MAX_LISTED_GAP:
            self.missing[start] = self._finding(
                "missing", f"entries {start} to {stop - 1} are not here", None, where,
                seq=start, entry_id=entry_id_for(self.account_id, start))
            self.seen.update(range(start + 1, stop))
            return
        for seq in range(start, stop):
            self.missing[seq] = self._finding(
                "missing", f"entry {seq} is not here: deleted", None, where, seq=seq,
                entry_id=entry_id_for(self.account_id, seq))

    def close(self, *, last_seq: int | None = None, entries: int | None = None,
              last_hash: str | None = None, balances: dict[str, int] | None = None,
              line: int | None = None, position: int | None = None) -> list[Finding]:
        """The end of the segment: report what never came, and compare with the end the
        segment declares (any of last seq, count, last hash, balances)."""
        where = {"line": line, "position": position}
        if last_seq is not None and _is_int(last_seq) and last_seq > self.last_seq:
            self._gap(max(self.expected, self.last_seq + 1), last_seq + 1, where)
        found = sorted(self.missing.values(), key=lambda f: f.seq or 0)
        self.missing = {}
        if last_seq is not None and _is_int(last_seq) and last_seq < self.last_seq:
            found += [self._finding("inserted", f"entry {seq} is beyond the declared last seq "
                                    f"{last_seq}", None, where, seq=seq,
                                    entry_id=entry_id_for(self.account_id, seq))
                      for seq in sorted(s for s in self.seen if s > last_seq)]
        if entries is not None and entries != self.count and not found:
            found.append(self._finding("end_mismatch", f"{self.count} entries, "
                                       f"{entries} declared", None, where))
        if last_hash is not None and last_hash != self.last_hash:
            found.append(self._finding(
                "end_mismatch", "the chain does not end at the declared last_hash: the last "
                "entry was changed, or entries after it removed", None, where,
                entry_id=self.prev_id, seq=self.last_seq if self.prev_id else None))
        if balances is not None and nonzero(self.balances) != nonzero(balances):
            found.append(self._finding("end_mismatch", f"the entries lead to balances "
                                       f"{nonzero(self.balances)}, declared {balances}",
                                       None, where))
        return found


def nonzero(balances: Any) -> Any:
    """Balances without the currencies at zero (a currency whose entries net to zero
    and one never used are the same balance)."""
    if not isinstance(balances, dict):
        return balances
    return {currency: amount for currency, amount in sorted(balances.items()) if amount != 0}
