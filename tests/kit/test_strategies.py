"""The kit's strategies against the contract: every valid body validates against the
operation's request schema, every ``invalid_*`` body does not (exactly the bodies the
service must answer ``400 validation_error``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.contract import contract, operations
from domain.testing import strategies as s

CASES = [
    ("adminAdjustBalance", s.adjustments(), s.invalid_adjustments()),
    ("createChargeSession", s.charge_sessions(), s.invalid_charge_sessions()),
    ("adminReconcilePaymentSession", s.reconciliations(), s.invalid_reconciliations()),
    ("adminCreateSku", s.skus(), s.invalid_skus()),
    ("adminCreateNode", s.node_registrations(), s.invalid_node_registrations()),
    ("adminUpsertNodeResourceSlots", s.slot_upserts("sl-a"), s.invalid_slot_upserts()),
    ("createAllocation", s.allocation_requests(), s.invalid_allocation_requests()),
    ("submitV3ComputeLaunch", s.launches(), s.invalid_launches()),
    ("internalNodeTaskResult", s.task_results(), s.invalid_task_results()),
    ("createAppInstance", s.app_instance_requests(), s.invalid_app_instance_requests()),
]


def _nullable(node: Any) -> Any:
    """OpenAPI's ``nullable: true`` as JSON Schema (``type`` also admits null)."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: Any) -> bool:
    if isinstance(value, str):
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


def validator(operation: str) -> jsonschema.Validator:
    doc = contract()
    method, path = operations(doc)[operation]
    schema = doc["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"]
    root = {**_nullable(schema), "components": _nullable(doc["components"])}
    return jsonschema.Draft202012Validator(root, format_checker=FORMATS)


@pytest.mark.parametrize("operation,valid,invalid", CASES, ids=[c[0] for c in CASES])
def test_valid_bodies_validate_and_invalid_ones_do_not(operation: str, valid: Any,
                                                       invalid: Any) -> None:
    schema = validator(operation)

    @settings(max_examples=100, deadline=None)
    @given(body=valid)
    def valid_ok(body: dict[str, Any]) -> None:
        errors = list(schema.iter_errors(body))
        assert not errors, (body, errors[0].message)

    @settings(max_examples=100, deadline=None)
    @given(body=invalid)
    def invalid_refused(body: dict[str, Any]) -> None:
        assert list(schema.iter_errors(body)), f"schema accepts {body}"

    valid_ok()
    invalid_refused()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 20), max_size=6, unique=True).flatmap(
    lambda items: st.tuples(st.just(items), s.in_any_order(items))))
def test_in_any_order_delivers_every_item_at_least_once(case: tuple[list[int], list[int]]) -> None:
    items, delivered = case
    assert set(delivered) == set(items) and len(delivered) >= len(items)
