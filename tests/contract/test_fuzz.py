"""Contract fuzzing: Schemathesis generates requests for every implemented operation
from the served OpenAPI document and sends them to a real uvicorn server over a
database of its own (docs/reliability.md, "Contract fuzzing").

Each response must be no 5xx; carry a status the operation declares (or one of the
undeclared statuses docs/decisions.md allows, ``UNDECLARED_ALLOWED``); have a body valid
against the contract's schema for that status (the three unsatisfiable schemas repaired
as docs/decisions.md records, the same repair ``tests/integration/test_invoices_budgets``
checks); be an ``ErrorResponse`` whenever it is a 4xx or 5xx; reject every request that
breaks the schema (a 4xx); answer an undeclared method with 405 and ``Allow``. After the
run every read model must have caught up with the event log.

The caller is a platform superadmin who is a member of ``PROJECT``: a generated
``X-Project-ID`` that is a uuid is replaced by ``PROJECT`` so requests get past project
scoping into validation and the domain (a malformed or missing one is kept, and must
be refused). The node task channel gets a node token for the generated ``node_id``.
A SKU, a node and two balances are seeded first (``seed``).

Bounded by default: the contract's explicit examples, Schemathesis's coverage phase
(boundary and negative values, undeclared methods, bad content types), ``EXAMPLES`` (5)
generated cases per operation, and ``STATEFUL_SCENARIOS`` (10) chains of at most
``STATEFUL_STEPS`` (10) linked calls. The long mode raises them:
``LEDGERCORE_FUZZ_EXAMPLES=200 LEDGERCORE_FUZZ_SCENARIOS=200 ./scripts/test
tests/contract/test_fuzz.py``; ``LEDGERCORE_FUZZ_STEPS`` sets the chain length,
``LEDGERCORE_FUZZ_SEED`` fixes the per-operation tests' seed, and
``LEDGERCORE_FUZZ_REPORT=path.json`` writes the counts (requests by phase, generation
mode, bad-input class and status) that docs/reliability.md quotes.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import hypothesis
import pytest
import schemathesis
from jsonschema import Draft202012Validator
from schemathesis import GenerationMode
from schemathesis.core.failures import AcceptedNegativeData, FailureGroup
from schemathesis.core.mutations import OperatorKind
from schemathesis.core.parameters import ParameterLocation

from api.app import implemented_routes
from api.auth import mint_token
from api.contract import served_document
from tests.contract.schemas import _normalise, error_schema
from tests.contract.test_contract import UNDECLARED_ALLOWED
from tests.harness import bearer

PROJECT, TENANT, ADMIN = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
#: seeded before the run (``seed``), and drawn for ``sku`` / ``node_id`` / ``user_id`` /
#: ``project_id`` / ``org_id`` half the time, so requests reach real resources and the
#: caller's own scope, not only 404s and 403s
SKU, NODE, USER = f"fuzz-{uuid.uuid4().hex[:8]}", uuid.uuid4(), uuid.uuid4()
EXAMPLES = int(os.environ.get("LEDGERCORE_FUZZ_EXAMPLES", "5"))
STATEFUL_SCENARIOS = int(os.environ.get("LEDGERCORE_FUZZ_SCENARIOS", "10"))
STATEFUL_STEPS = int(os.environ.get("LEDGERCORE_FUZZ_STEPS", "10"))
SEED = os.environ.get("LEDGERCORE_FUZZ_SEED")


def repair(doc: dict[str, Any]) -> dict[str, Any]:
    """docs/decisions.md's repair of the three unsatisfiable schemas: ``display_name``
    (required, undeclared, in a closed schema) dropped from ``required`` of
    ``BillingAccountResponse`` and ``BillingBudgetPosture``; ``BillingInvoiceDetail``'s
    two closed ``allOf`` parts merged into one closed object."""
    components = doc["components"]["schemas"]
    for name in ("BillingAccountResponse", "BillingBudgetPosture"):
        if name in components:
            components[name]["required"].remove("display_name")
    if "BillingInvoiceDetail" in components:
        summary = copy.deepcopy(components["BillingInvoiceSummary"])
        extra = components["BillingInvoiceDetail"]["allOf"][1]
        summary["properties"].update(extra["properties"])
        summary["required"] += extra["required"]
        components["BillingInvoiceDetail"] = summary
    return doc


#: request properties the contract lists as required *and* gives a default; we read the
#: default as the value when the property is left out (a request without it is served,
#: not refused), so generation treats them as optional (docs/reliability.md)
REQUIRED_WITH_DEFAULT = {"CreateChargeSessionRequest": ("currency",)}


def fuzz_document() -> dict[str, Any]:
    """The served document (``GET /openapi.json``; test_contract keeps them equal) with
    OpenAPI 3.0-style ``nullable`` spelled as JSON Schema, as every other contract test
    reads it, the repair above, and ``REQUIRED_WITH_DEFAULT`` (request schemas only)."""
    doc = repair(_normalise(copy.deepcopy(served_document(set(implemented_routes())))))
    for name, properties in REQUIRED_WITH_DEFAULT.items():
        schema = doc["components"]["schemas"][name]
        for prop in properties:
            assert "default" in schema["properties"][prop], (name, prop)
            schema["required"].remove(prop)
    return doc


DOCUMENT = fuzz_document()

CONFIG = schemathesis.Config.from_dict({
    **({"seed": int(SEED)} if SEED else {}),
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        # links between operations are inferred from the schemas (the contract declares
        # none): ``POST /admin/nodes`` feeds ``node_id`` to the node lifecycle, and so on
        "stateful": {"enabled": True,
                     "inference": {"algorithms": ["dependency-analysis", "location-headers"]}},
    },
    # "all": positive and negative cases. No extra (undeclared) query parameters or
    # headers as a negative case: like most HTTP APIs we ignore unknown query parameters
    "generation": {"max-examples": EXAMPLES, "mode": "all", "allow-extra-parameters": False},
    "checks": {
        # replaced by ``contract_conformance`` (declared, or UNDECLARED_ALLOWED + ErrorResponse)
        "status_code_conformance": {"enabled": False},
        # a schema-valid request may still be refused by the domain: an unknown id (404),
        # an unpaid debit, a missing mandatory Idempotency-Key (400), a conflict (409)
        "positive_data_acceptance": {"enabled": False},
    },
    "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large",
                              "large_base_example"],
    "dictionaries": {"sku": {"values": [SKU]}, "node": {"values": [str(NODE)]},
                     "user": {"values": [str(ADMIN), str(USER)]},
                     "project": {"values": [str(PROJECT)]}, "org": {"values": [str(TENANT)]}},
    "parameters": {
        **{key: {"dictionary": "sku", "probability": 0.5} for key in ("sku", "body.sku")},
        **{key: {"dictionary": "node", "probability": 0.5} for key in ("node_id", "body.node_id")},
        "user_id": {"dictionary": "user", "probability": 0.5},
        **{key: {"dictionary": "project", "probability": 0.5}
           for key in ("project_id", "body.project_id")},
        "org_id": {"dictionary": "org", "probability": 0.5},
    },
})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


# ---- our own check: the contract as every other contract test reads it -------------
@lru_cache(maxsize=None)
def _validator(method: str, path: str, status: int) -> Draft202012Validator | None:
    """Validator of ``status``'s body (repaired contract), None if declared without a body;
    KeyError if the status is not declared."""
    responses = DOCUMENT["paths"][path][method.lower()]["responses"]
    declared = responses[str(status)]
    if "$ref" in declared:
        declared = DOCUMENT["components"]["responses"][declared["$ref"].rsplit("/", 1)[1]]
    content = declared.get("content")
    if not content:
        return None
    media = content.get("application/json")
    if media is None:
        return Draft202012Validator(True)  # a CSV export: content type checked by Schemathesis
    return Draft202012Validator({**media["schema"], "components": DOCUMENT["components"]})


ERROR_VALIDATOR = Draft202012Validator(error_schema())


def contract_conformance(ctx: Any, response: Any, case: Any) -> None:
    """Status declared or in UNDECLARED_ALLOWED; body valid for it; errors are ErrorResponses."""
    method, path, status = case.method.upper(), case.operation.path, response.status_code
    if method.lower() not in DOCUMENT["paths"][path]:
        # an undeclared method probe: ``unsupported_method`` judges the status and Allow
        if status >= 400:
            assert ERROR_VALIDATOR.is_valid(response.json()), f"{method} {path} {status}"
        return
    try:
        validator = _validator(method, path, status)
    except KeyError:
        assert status in UNDECLARED_ALLOWED, f"{method} {path} answered undeclared {status}"
        validator = ERROR_VALIDATOR
    if status >= 400:
        validator = ERROR_VALIDATOR
    if validator is None:
        assert response.content == b"", f"{method} {path} {status} has a body"
        return
    if "json" not in (response.headers.get("content-type") or [""])[0]:
        assert status < 400, f"{method} {path} {status} is not JSON"
        return
    problems = [f"{list(e.absolute_path)}: {e.message}"
                for e in validator.iter_errors(response.json())]
    assert not problems, f"{method} {path} {status}: {problems[:5]}"


# ---- the run ------------------------------------------------------------------------
STATS: dict[str, Counter[str]] = {k: Counter() for k in
                                  ("phase", "mode", "scenario", "mutation", "status",
                                   "operation", "outcome")}


def seed(served: Any, token: str) -> None:
    """An active SKU, a node of it (its id chosen: through the domain, as the API assigns
    one), and balances for the caller and a second user."""
    from domain import nodes
    from domain.provenance import CommandContext

    admin = bearer(token)
    spec = {"vendor": "nvidia", "display_name": "Fuzz GPU", "resource_class": "gpu_baremetal",
            "billing_unit": "node_hour", "scheduling_unit": "node",
            "resources": {"accelerator_count": 8, "allowed_accelerator_counts": [8]},
            "unit_price": {"amount_minor": 300, "currency": "USD"}}
    with httpx.Client(base_url=served.url, timeout=30) as http:
        assert http.post("/api/v1/admin/skus", json={"sku": SKU, **spec},
                         headers=admin).status_code == 201
        assert http.post(f"/api/v1/admin/skus/{SKU}/activate", headers=admin).status_code == 200
        for user in (ADMIN, USER):
            credit = {"direction": "credit", "amount_minor": 10**9, "currency": "USD",
                      "reason": "fuzz"}
            assert http.post(f"/api/v1/admin/users/{user}/balance", json=credit,
                             headers=admin).status_code == 200
    identity = {"host": "127.0.0.1", "hostname": None, "port": 1, "ssh_username": "ubuntu",
                "sku": SKU, "gpus_total": 8, "region_code": "region-maas-1",
                "onboarding_mode": "manual"}
    ctx = CommandContext(actor_id=str(ADMIN), source="admin", actor_role="admin")
    outcome = served.stores.app.execute(nodes.register_node(
        ctx, identity=identity, online=True, node_id=NODE,
        render=lambda result: {"status": 200, "body": {}}))
    assert outcome.response["status"] == 200, outcome.response


@pytest.fixture(scope="module")
def served(services: Any, admin_token: str) -> Iterator[Any]:
    from tests.conftest import serve_own_database
    with serve_own_database(services) as server:
        seed(server, admin_token)
        yield server
    report = os.environ.get("LEDGERCORE_FUZZ_REPORT")
    if report:
        with open(report, "w") as out:
            json.dump({k: dict(v.most_common()) for k, v in STATS.items()}, out, indent=1)


@pytest.fixture(scope="module")
def admin_token(tokens: Any) -> str:
    return mint_token(tokens.secret, user_id=ADMIN, tenant_id=TENANT, role="admin",
                      platform_roles=["platform_superadmin"], project_ids=[str(PROJECT)])


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def caller_headers(case: Any, admin_token: str, secret: str) -> dict[str, str]:
    """The caller's token; a generated uuid X-Project-ID becomes the caller's project."""
    if case.headers and _is_uuid(case.headers.get("X-Project-ID")):
        case.headers["X-Project-ID"] = str(PROJECT)
    node = (case.path_parameters or {}).get("node_id")
    if case.operation.path.startswith("/internal/") and _is_uuid(node):
        return bearer(mint_token(secret, user_id=str(node), actor_type="node"))
    return bearer(admin_token)


def record(case: Any, status: int) -> None:
    meta = case.meta
    STATS["operation"][case.operation.label] += 1
    STATS["status"][str(status)] += 1
    STATS["outcome"][f"{case.operation.label} {status}"] += 1
    if meta is None:
        return
    STATS["phase"][meta.phase.name.value] += 1
    STATS["mode"][meta.generation.mode.value] += 1
    scenario = getattr(meta.phase.data, "scenario", None)
    if scenario is not None:
        STATS["scenario"][scenario.value] += 1
    for mutation in getattr(meta.phase.data, "mutations", ()) or ():
        STATS["mutation"][f"{mutation.operator.value} in {mutation.parameter_location.value}"] += 1


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def null_read_as_absent(case: Any, failure: Any) -> bool:
    """A schema-violating body accepted only because an optional, non-nullable property
    was sent as ``null``, which the API reads as absent (docs/reliability.md): with the
    nulls dropped the body is valid, and nothing but the body was negated."""
    if not isinstance(failure, AcceptedNegativeData) or case.meta is None:
        return False
    for location, info in case.meta.components.items():
        if info.mode is not GenerationMode.POSITIVE and location is not ParameterLocation.BODY:
            return False
    if not isinstance(case.body, dict):
        return False
    body = case.operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**body, "components": DOCUMENT["components"]})
    return validator.is_valid(_without_nulls(case.body))


def _parameter(case: Any, location: str, name: str) -> dict[str, Any] | None:
    """The operation's declared parameter (``$ref`` resolved), or None."""
    item = DOCUMENT["paths"][case.operation.path]
    for declared in item.get("parameters", []) + item[case.method.lower()].get("parameters", []):
        if "$ref" in declared:
            declared = DOCUMENT["components"]["parameters"][declared["$ref"].rsplit("/", 1)[1]]
        if declared["in"] == location and declared["name"] == name:
            return declared
    return None


def _query_valid_as_sent(case: Any, name: str, sent: dict[str, list[str]]) -> bool:
    """Is query parameter ``name``, as the text that went over the wire, valid? Judged
    for strings and arrays of strings only (the text is the value); anything else is
    left to Schemathesis."""
    declared = _parameter(case, "query", name)
    if declared is None:
        return False
    texts = sent.get(name)
    if texts is None:
        return not declared.get("required", False)
    schema = declared["schema"]
    if schema.get("type") == "array" and schema.get("items", {}).get("type") == "string":
        value: Any = texts
    elif schema.get("type") == "string" and len(texts) == 1:
        value = texts[0]
    else:
        return False
    return Draft202012Validator({**schema, "components": DOCUMENT["components"]}).is_valid(value)


def negation_not_sent(case: Any, response: Any, failure: Any) -> bool:
    """A request negated in its query and headers whose every negated part went over the
    wire valid, so accepting it is right. Schemathesis 4.32 leaves out a header it
    "dropped" only when the whole negation is in the headers: dropped together with a
    query mutation, the ``Authorization`` the caller always sends goes out after all;
    and a boolean generated for an array of strings goes out as the string ``false``.
    Seen: ``GET /api/v1/v3/platform/evidence/audit/export?action=false`` → 200."""
    meta = case.meta
    if not isinstance(failure, AcceptedNegativeData) or meta is None:
        return False
    mutations = getattr(meta.phase.data, "mutations", ()) or ()
    if not mutations or any(meta.is_negative_at(where) for where in (
            ParameterLocation.BODY, ParameterLocation.PATH, ParameterLocation.COOKIE)):
        return False
    request = response.request
    sent = parse_qs(urlsplit(request.url).query, keep_blank_values=True)
    for mutation in mutations:
        where, name = mutation.parameter_location, mutation.parameter
        if where is ParameterLocation.HEADER:
            dropped = mutation.operator is OperatorKind.REMOVE_REQUIRED_PROPERTY or (
                mutation.operator is OperatorKind.NEGATE_CONSTRAINTS
                and tuple(mutation.keywords) == ("required",))
            if name != "Authorization" or not dropped or name not in request.headers:
                return False
        elif where is not ParameterLocation.QUERY or not name \
                or not _query_valid_as_sent(case, name, sent):
            return False
    return True


def validate(case: Any, response: Any, headers: dict[str, str], base_url: str) -> None:
    """Schemathesis's checks and ``contract_conformance``, less what we tolerate."""
    try:
        case.validate_response(response, headers=headers,
                               additional_checks=[contract_conformance],
                               transport_kwargs={"base_url": base_url, "headers": headers})
    except FailureGroup as group:
        left = [f for f in group.exceptions if not null_read_as_absent(case, f)
                and not negation_not_sent(case, response, f)]
        if left:
            raise FailureGroup(left, group.message) from None


@schema.parametrize()
def test_every_operation_holds_the_contract_under_fuzzing(case: Any, served: Any,
                                                          admin_token: str, tokens: Any) -> None:
    headers = caller_headers(case, admin_token, tokens.secret)
    response = case.call(base_url=served.url, headers=headers, timeout=30)
    record(case, response.status_code)
    validate(case, response, headers, served.url)


def test_chains_of_linked_operations_hold_the_contract(served: Any, admin_token: str,
                                                      tokens: Any) -> None:
    """Stateful: Hypothesis walks chains of operations, feeding ids from one response to
    the next request along the inferred links; every step is checked as above."""
    base = schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": served.url, "timeout": 30,
                    "headers": caller_headers(case, admin_token, tokens.secret)}

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            record(case, response.status_code)
            validate(case, response, kwargs["headers"], served.url)

    Workflow.run(settings=hypothesis.settings(
        max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS, deadline=None,
        database=None, suppress_health_check=list(hypothesis.HealthCheck)))


def test_the_read_models_kept_up_with_everything_the_fuzzer_wrote(served: Any) -> None:
    """A request the API accepted must not stop a projection (a NUL in a SKU's name once
    wedged the inventory projection for good): after the run every read model reaches the
    end of the event log."""
    from api.consistency import wait_for
    from projections import BY_NAME

    last = served.stores.app.recorder.max_notification_id() or 0
    behind = {name: wait_for(served.stores, name, last, 30)[1] for name in BY_NAME}
    assert all(at >= last for at in behind.values()), (last, behind)
