"""Field types the request models and query parameters share, where the framework's own
would let through what the contract (or canonical JSON) does not."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

from domain.canonical import first_float


def _integers_only(value: dict[str, Any]) -> dict[str, Any]:
    where = first_float(value)
    if where is not None:
        raise ValueError(f"numbers must be integers (a float at {where}): the body is "
                         "hashed as canonical JSON, which has no floats")
    return value


#: a free-form JSON object in a request body (``scheduler_request``, ``metadata``, …):
#: anything JSON but floats, which canonical JSON refuses (docs/decisions.md), so a
#: float is a 400 here instead of a 500 when the body is fingerprinted or signed
JsonObject = Annotated[dict[str, Any], AfterValidator(_integers_only)]

#: RFC 3339 ``date-time`` (the contract's ``format: date-time``): full date, ``T``, time,
#: and a ``Z`` or numeric offset
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("must carry a UTC offset")
        return value
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2025-01-31T00:00:00Z")
    return value


#: a ``format: date-time`` value: pydantic's own ``datetime`` also takes unix seconds
#: (``to=0.5``) and offset-less times, which then cannot be compared with aware ones
Instant = Annotated[datetime, BeforeValidator(_rfc3339)]
