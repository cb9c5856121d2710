"""Tenancy: no caller learns or touches another tenant's or project's data, over every
implemented operation (api-conventions §2.4, §2.5, §4.2, §6.3; docs/decisions.md).

Tenant A owns one of each kind of resource with an id (``tenancy_fixtures``); tenant B
has its own tenant and project; N is another project of A's tenant. Over every
operation whose request names a resource or a scope:

- **Foreign ids** (the caller's own scope, A's real ids in the path, the query or the
  body; B everywhere, N wherever the answer is not tenant-wide): the documented refusal
  (404 ``*_not_found`` for a resource, 403 on operator routes), an ``ErrorResponse``,
  and the very answer a random id gets: same status, code, message and details (the id
  sent aside). Nothing is appended to the event log.
- **Foreign scope** (``X-Project-ID``, path ``project_id`` or ``org_id``, ``X-Tenant-ID``
  naming A's; as a B user, as B's service account, and as N for A's project): 403, as
  for a project that does not exist.
- **Lower roles**, where the contract or docs/decisions.md tells roles apart: a project
  member on the adapter's report operations and on entitlement upserts; ``platform_ops``
  on the operations the contract reserves for platform admins; a project ``viewer`` on
  every project-scoped mutation (403 ``insufficient_permissions``, nothing written),
  while the same person as ``member`` gets the domain's answer; the project and tenant
  audit lists per project and tenant role; a tenant ``billing_viewer`` on billing reads
  (the owner's answers) and mutations (403); and an unknown role value (401).
- **Lists and queries** B (and N, where not tenant-wide) may call in its own scope
  answer 200 with none of A's identifiers, even right after A asked the same (the read
  cache), and a token whose project list shrank is not served the older token's answer.
- **Cursors** A obtained are refused to B (``400 invalid_request``, ``cursor_mismatch``),
  in B's scope and in A's, and never page through A's rows.
- **Idempotency keys** are the caller's: B sending A's key and body gets its own outcome,
  and A's replay still answers A's first response.
- **Input limits** not covered elsewhere: an empty ``Idempotency-Key`` or one over 128
  characters on every operation that declares the header, and every request-body string
  one character over its contract ``maxLength``.

Unauthenticated callers, plain users on operator routes, the node channel, ``page_size``,
body size and ``X-Request-Id`` length are ``test_auth_matrix.py``'s and
``test_input_limits.py``'s. ``LEDGERCORE_TENANCY_REPORT=path.json`` writes the counts
docs/reliability.md quotes.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from psycopg.sql import SQL, Identifier

from api.app import implemented_routes
from api.auth import mint_token
from api.contract import contract
from tests.contract.schemas import error_schema, errors_in
from tests.contract.tenancy_fixtures import (BALANCE_A, World, key_of, keyed_requests,
                                             sku_body, world)
from tests.integration.test_inventory_commands import appended

ROUTES = implemented_routes()
OPERATOR = ("/api/v1/admin/", "/api/v1/platform/", "/api/v1/v3/platform/")
#: no caller identity to scope (health, the provider-signed webhook) or not a tenant's
#: (the node agent's channel, whose callers test_auth_matrix.py covers)
UNSCOPED = {"getHealth", "stripeWebhook", "internalNodeWaitTask", "internalNodeTaskResult"}

#: path parameters that name a tenant's resource -> the key of A's in ``World.secrets``
TENANT_PATH = {"allocation_id": "allocation", "app_instance_id": "app_instance",
               "member_id": "member", "operation_id": "member_operation",
               "repair_operation_id": "repair_operation", "task_id": "task",
               "workload_id": "workload", "invoice_id": "invoice",
               "rated_usage_line_id": "rated_line", "payment_session_id": "payment_session",
               "user_id": "user", "scope_id": "project"}
#: query parameters and body fields that name A's resources (``<key>`` is A's value)
QUERY = {
    "listBillingUsage": {"allocation_id": "<allocation>", "app_instance_id": "<app_instance>"},
    "exportBillingUsageCsv": {"allocation_id": "<allocation>",
                              "app_instance_id": "<app_instance>"},
    "listBillingRatedUsage": {"usage_record_id": "<usage_record>"},
    "listBillingBudgetPosture": {"project_id": "<project>"},
    "listMyAuditLogs": {"correlation_id": "<correlation_0>"},
    "listProjectAuditLogs": {"correlation_id": "<correlation_0>"},
    "listOrgAuditLogs": {"correlation_id": "<correlation_0>"},
    "listV3AccountEvidenceAuditLogs": {"correlation_id": "<correlation_0>"},
    "listV3ProjectEvidenceAuditLogs": {"actor_user_id": "<user>",
                                       "correlation_id": "<correlation_0>"},
    "listV3TenantEvidenceAuditLogs": {"actor_user_id": "<user>",
                                      "correlation_id": "<correlation_0>"},
    "listV3Workloads": {"search": "<workload>"},
    "adminListAllocations": {"user_id": "<user>"},
    "adminListPaymentSessions": {"user_id": "<user>"},
    "adminListAuditLogs": {"actor_user_id": "<user>"},
}
PLACED = {"placement_intent": {"target_allocation_id": "<allocation>"}}
#: bodies valid up to the lookup, so a refusal is about the ids, not the body
BODIES: dict[str, Any] = {
    "createAllocation": {"scheduler_type": "bare_metal", "scheduler_request": {"sku": "<sku>"}},
    "submitV3ComputeLaunch": {"sku": "<sku>", "unit_count": 1},
    "precheckV3ComputeLaunch": {"sku": "<sku>"},
    "submitV3AppLaunch": {"app_version": "1", **PLACED},
    "precheckV3AppLaunch": {"app_version": "1", **PLACED},
    "createAppInstance": {"app_slug": "<slug>", "app_version": "1", "display_name": "b",
                          **PLACED},
    "createAppInstanceMemberOperation": {"action": "add", "component_key": "w"},
    "createV3AppInstanceMemberOperation": {"action": "add", "component_key": "w"},
    "createAppInstanceRepairOperation": {"action": "reconcile", "scope": "whole_runtime"},
    "repairV3AppInstance": {"action": "reconcile", "scope": "whole_runtime"},
    "upgradeAppInstance": {"app_version": "2"}, "upgradeV3AppInstance": {"app_version": "2"},
    "rollbackAppInstance": {"app_version": "1"}, "rollbackV3AppInstance": {"app_version": "1"},
    "reportAppInstance": {"status": "running"},
    "reportAppInstanceMember": {"status": "ready"},
    "reportAppInstanceMemberOperation": {"status": "in_progress"},
    "reportAppInstanceRepairOperation": {"status": "in_progress"},
    "evaluateBillingBudgetDecision": {"project_id": "<project>",
                                      "proposed_amount": {"amount_minor": 100,
                                                          "currency": "USD"}},
    "createChargeSession": {"amount_minor": 100, "currency": "USD"},
    "upsertProjectAppEntitlement": {"enabled": True},
    "upsertV3AccessAppEntitlement": {"enabled": True},
}
#: the audit lists only project or tenant administrators read: callers in their own
#: scope send them as the project's and tenant's owner, so the answer is the scope's
ADMINISTERED = {"listProjectAuditLogs", "listV3ProjectEvidenceAuditLogs", "listOrgAuditLogs",
                "listV3TenantEvidenceAuditLogs"}
#: the adapter's operations: B's side calls them with B's service account
REPORTS = {"reportAppInstance", "reportAppInstanceMember", "reportAppInstanceMemberOperation",
           "reportAppInstanceRepairOperation"}
#: keys of a body that change with every answer
VOLATILE = {"correlation_id", "generated_at", "cache"}

TALLY: Counter[str] = Counter()


def canonical(operation_id: str) -> str:
    return operation_id.removesuffix("Compat")


def parameters(operation_id: str) -> list[str]:
    method, path = ROUTES[operation_id]
    found = contract()["paths"][path][method.lower()].get("parameters", [])
    return [p.get("$ref", "").rsplit("/", 1)[-1] or p.get("name", "") for p in found]


def path_names(operation_id: str) -> list[str]:
    return re.findall(r"{(\w+)}", ROUTES[operation_id][1])


def scope_of(operation_id: str) -> str:
    """How the operation is scoped: operator, header, project, org, tenant or caller."""
    path, names = ROUTES[operation_id][1], path_names(operation_id)
    if path.startswith(OPERATOR):
        return "operator"
    if "ProjectIdHeader" in parameters(operation_id):
        return "header"
    if "project_id" in names:
        return "project"
    if "org_id" in names:
        return "org"
    if "X-Tenant-ID" in parameters(operation_id):
        return "tenant"
    return "caller"


def tenant_slots(operation_id: str) -> list[str]:
    return [n for n in path_names(operation_id) if n in TENANT_PATH]


def slots(operation_id: str) -> set[str]:
    """The names of A's values the operation's request carries."""
    op = canonical(operation_id)
    found = {TENANT_PATH[n] for n in tenant_slots(operation_id)}
    found |= set(re.findall(r'"<(\w+)>"', json.dumps([QUERY.get(op), BODIES.get(op)])))
    return found - {"sku", "slug"}


SCOPED = sorted(op for op in ROUTES if op not in UNSCOPED)
FOREIGN_IDS = [op for op in SCOPED if slots(op)]
FOREIGN_SCOPE = [op for op in SCOPED if scope_of(op) in ("header", "project", "org", "tenant")]
READS = [op for op in SCOPED if scope_of(op) != "operator" and not tenant_slots(op)
         and (ROUTES[op][0] == "GET" or "precheck" in op or op == "evaluateBillingBudgetDecision")]


# ---- the world and requests -----------------------------------------------------------------
@pytest.fixture(scope="module")
def w(services: Any, tokens: Any) -> Iterator[World]:
    with world(services, tokens.secret) as built:
        yield built
        report = os.environ.get("LEDGERCORE_TENANCY_REPORT")
        if report:
            with open(report, "w") as out:
                json.dump({"requests": built.requests,
                           "statuses": dict(sorted(built.statuses.items())),
                           **dict(sorted(TALLY.items()))}, out, indent=1)


@pytest.fixture(autouse=True)
def _requests_per_test(request: pytest.FixtureRequest, w: World) -> Iterator[None]:
    before = w.requests
    yield
    TALLY[f"requests: {request.function.__name__}"] += w.requests - before


def fill(value: Any, values: dict[str, str]) -> Any:
    """``value`` with every ``"<name>"`` string replaced by ``values[name]``."""
    if isinstance(value, dict):
        return {k: fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, values) for v in value]
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return values[value[1:-1]]
    return value


def random_like(name: str) -> str:
    """A value of the same shape as A's value ``name`` that names nothing."""
    if name.startswith("correlation"):
        return f"tenant-a-{uuid.uuid4().hex}"
    return str(uuid.uuid4())


def strip(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: strip(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [strip(v) for v in body]
    return body


def normalised(response: httpx.Response, sent: dict[str, str]) -> tuple[int, Any]:
    """The answer with every value the caller sent replaced by its slot's name."""
    text = response.text
    for name, value in sorted(sent.items(), key=lambda item: -len(item[1])):
        text = text.replace(value, f"<{name}>")
    try:
        return response.status_code, strip(json.loads(text))
    except ValueError:
        return response.status_code, text


def leaks(w: World, response: httpx.Response, sent: set[str] = frozenset(),
          known: set[str] = frozenset()) -> list[str]:
    """Names of A's identifiers in the answer that the caller did not send itself
    (``known``: names of those the caller may know, such as its own tenant's id)."""
    text = response.text.lower() + " ".join(response.headers.values()).lower()
    return [name for name, value in w.secrets.items()
            if name not in known and value not in sent and value.lower() in text]


def refusal(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert not errors_in(body, error_schema()), (response.status_code, body)
    return body


class Probe:
    """One operation sent by one caller: the path, query and body filled from
    ``values`` (slot name -> value)."""

    def __init__(self, w: World, operation_id: str, token: str, scope: dict[str, str]):
        self.w, self.operation_id, self.token, self.scope = w, operation_id, token, scope
        self.method, self.template = ROUTES[operation_id]

    def send(self, values: dict[str, str], *, key: bool = False,
             query: dict[str, Any] | None = None) -> httpx.Response:
        """``query`` replaces the operation's usual query (``QUERY``)."""
        w, op = self.w, canonical(self.operation_id)
        fixed = {"sku": w.skus[0], "slug": w.slugs[0]}
        path = {}
        for name in path_names(self.operation_id):
            if name in TENANT_PATH:
                path[name] = values[TENANT_PATH[name]]
            elif name in ("project_id", "org_id"):
                path[name] = self.scope[name]
            else:
                path[name] = {"app_slug": w.slugs[0], "sku": w.skus[0], "version": "1",
                              "node_id": w.nodes[0], "scope_type": "project",
                              "stream_seq": "1"}.get(name, str(uuid.uuid4()))
        headers = {}
        if "X-Tenant-ID" in self.scope:
            headers["X-Tenant-ID"] = self.scope["X-Tenant-ID"]
        body = fill(BODIES.get(op), {**values, **fixed})
        if body is None and self.method in ("POST", "PUT", "PATCH"):
            body = {}
        needs_key = key or op in ("submitV3ComputeLaunch", "submitV3AppLaunch")
        return w.call(self.method, self.template, self.token,
                      project=self.scope.get("X-Project-ID"), body=body,
                      query=fill(QUERY.get(op), values) if query is None else query,
                      headers=headers, key=uuid.uuid4().hex if needs_key else None, **path)


# ---- A's ids in B's own scope -----------------------------------------------------------
def own_scope(w: World, operation_id: str, tenant: Any) -> dict[str, str]:
    kind = scope_of(operation_id)
    return {"header": {"X-Project-ID": str(tenant.project)},
            "project": {"project_id": str(tenant.project)},
            "org": {"org_id": str(tenant.tenant)}}.get(kind, {})


#: tenant-wide answers, which a neighbour (another project of A's tenant) rightly shares
TENANT_WIDE = {"getBillingAccount", "getBillingCurrencySettings", "listBillingBudgetPosture",
               "evaluateBillingBudgetDecision"}


def project_private(operation_id: str) -> bool:
    """Whether the operation answers about one project's or one user's data only."""
    return scope_of(operation_id) not in ("operator", "org", "tenant") \
        and canonical(operation_id) not in TENANT_WIDE


CALLERS = {"other tenant": "b", "same tenant": "n"}


@pytest.mark.parametrize("operation_id, caller",
                         [(op, "other tenant") for op in FOREIGN_IDS]
                         + [(op, "same tenant") for op in FOREIGN_IDS if project_private(op)])
def test_a_foreign_id_is_answered_like_a_random_one(w: World, operation_id: str,
                                                    caller: str) -> None:
    """B (another tenant) or N (another project of A's tenant) names A's real resources
    from its own scope: refused exactly as for ids that exist nowhere, with nothing of
    A's in the answer and nothing written."""
    TALLY[f"foreign ids ({caller}): operations"] += 1
    them = getattr(w, CALLERS[caller])
    token = them.adapter if canonical(operation_id) in REPORTS else \
        them.token if canonical(operation_id) in ADMINISTERED else them.member_token
    probe = Probe(w, operation_id, token, own_scope(w, operation_id, them))
    names = slots(operation_id)
    theirs = {n: w.secrets[n] for n in names}
    random = {n: random_like(n) for n in theirs}
    before = appended(w.stores)
    real, fake = probe.send(theirs), probe.send(random)
    assert appended(w.stores) == before, f"{operation_id} wrote events for B"
    assert real.status_code < 500, real.text
    assert normalised(real, theirs) == normalised(fake, random), (operation_id, real.text,
                                                                  fake.text)
    known = {"tenant"} if them is w.n else set()
    assert not leaks(w, real, set(theirs.values()), known), (leaks(w, real), real.text)
    if scope_of(operation_id) == "operator":
        assert real.status_code == 403, real.text
    elif tenant_slots(operation_id):
        assert real.status_code == 404, (operation_id, real.text)
    if real.status_code >= 400:
        refusal(real)


def test_the_foreign_ids_are_real(w: World) -> None:
    """The ids the matrix sends exist: each resolves for its owner in A's scope."""
    for operation_id in FOREIGN_IDS:
        if ROUTES[operation_id][0] != "GET" or scope_of(operation_id) == "operator" \
                or not tenant_slots(operation_id):
            continue
        probe = Probe(w, operation_id, w.a.token, own_scope(w, operation_id, w.a))
        owned = probe.send({n: w.secrets[n] for n in slots(operation_id)})
        assert owned.status_code == 200, (operation_id, owned.text)
        TALLY["foreign ids: owner controls"] += 1


# ---- A's scope --------------------------------------------------------------------------
def foreign_scope(w: World, operation_id: str, project: str, tenant: str) -> dict[str, str]:
    kind = scope_of(operation_id)
    return {"header": {"X-Project-ID": project}, "project": {"project_id": project},
            "org": {"org_id": tenant}, "tenant": {"X-Tenant-ID": tenant}}[kind]


@pytest.mark.parametrize("operation_id, caller",
                         [(op, who) for op in FOREIGN_SCOPE for who in ("B", "B's adapter")]
                         + [(op, "N") for op in FOREIGN_SCOPE
                            if scope_of(op) in ("header", "project")])
def test_a_foreign_scope_is_refused_like_a_missing_one(w: World, operation_id: str,
                                                       caller: str) -> None:
    """B (as a user or as its adapter) names A's project or tenant, or N names A's
    project, with A's ids in it: 403, the same answer as for a project or tenant that
    does not exist."""
    TALLY[f"foreign scope ({caller}): operations"] += 1
    person = "token" if canonical(operation_id) in ADMINISTERED else "member_token"
    token = {"B": getattr(w.b, person), "B's adapter": w.b.adapter,
             "N": getattr(w.n, person)}[caller]
    theirs = {n: w.secrets[n] for n in slots(operation_id) | {"project", "tenant"}}
    random = {n: random_like(n) for n in theirs}
    before = appended(w.stores)
    answers = []
    for values in (theirs, random):
        scope = foreign_scope(w, operation_id, values["project"], values["tenant"])
        answers.append(Probe(w, operation_id, token, scope).send(values))
    real, fake = answers
    assert appended(w.stores) == before, f"{operation_id} wrote events for B"
    assert real.status_code == 403, (operation_id, real.text)
    expected = {"insufficient_permissions", "token_scope_invalid", "admin_required"}
    if caller == "B's adapter" and scope_of(operation_id) in ("header", "project"):
        expected = {"token_scope_invalid", "admin_required"}
    assert refusal(real)["code"] in expected, real.text
    assert normalised(real, theirs) == normalised(fake, random), (real.text, fake.text)
    known = {"tenant"} if caller == "N" else set()
    assert not leaks(w, real, set(theirs.values()), known), real.text


# ---- lower roles ------------------------------------------------------------------------
def test_a_project_member_is_not_the_apps_adapter_nor_an_entitlement_admin(w: World) -> None:
    """A's second member (a person of the project) may not report as the adapter, nor
    grant the project an app: 403, and nothing is written."""
    member = w.a.member_token
    scope = own_scope(w, "reportAppInstance", w.a)
    before = appended(w.stores)
    for operation_id in sorted(REPORTS):
        response = Probe(w, operation_id, member, scope).send(
            {n: w.secrets[n] for n in slots(operation_id)})
        assert response.status_code == 403, (operation_id, response.text)
        assert refusal(response)["code"] == "insufficient_permissions"
        TALLY["lower role: refusals"] += 1
    for operation_id, where in (("upsertProjectAppEntitlement", scope),
                                ("upsertV3AccessAppEntitlementCompat",
                                 {"X-Project-ID": str(w.a.project)})):
        response = Probe(w, operation_id, member, where).send({}, key=True)
        assert response.status_code == 403, (operation_id, response.text)
        assert refusal(response)["code"] == "admin_required"
        TALLY["lower role: refusals"] += 1
    assert appended(w.stores) == before


#: the contract's "Requires platform admin permission" operations, and money movements
#: (docs/decisions.md: ``adminAdjustBalance`` needs ``platform.admin``)
ADMIN_ONLY = ["cordonV3PlatformNode", "cordonV3PlatformNodeCompat", "drainV3PlatformNode",
              "drainV3PlatformNodeCompat", "resumeSchedulingV3PlatformNode",
              "resumeSchedulingV3PlatformNodeCompat", "adminAdjustBalance"]
#: the contract's "Requires platform ops read permission" operations
OPS_READ = ["getV3PlatformFinance", "getV3PlatformFinanceCompat", "getV3PlatformFinanceSessions",
            "getV3PlatformFinanceSessionsCompat"]


def test_platform_ops_is_refused_what_needs_platform_admin(w: World) -> None:
    """``platform_ops`` holds the ops capabilities, not ``platform.admin``: refused the
    node lifecycle moves and money movements (403 ``admin_required``, A's balance and the
    log untouched), served the finance reads the contract gives to ops read."""
    balance = w.call("GET", "/api/v1/billing/balance", w.a.token).json()
    before = appended(w.stores)
    for operation_id in ADMIN_ONLY:
        method, template = ROUTES[operation_id]
        response = w.call(method, template, w.ops, key=uuid.uuid4().hex, node_id=w.nodes[0],
                          user_id=w.a.user, body={"direction": "debit", "amount_minor": BALANCE_A,
                                                  "currency": "USD", "reason": "drain"}
                          if operation_id == "adminAdjustBalance" else None)
        assert response.status_code == 403, (operation_id, response.text)
        assert refusal(response)["code"] == "admin_required", response.text
        TALLY["lower role: refusals"] += 1
    assert appended(w.stores) == before
    for operation_id in OPS_READ:
        method, template = ROUTES[operation_id]
        response = w.call(method, template, w.ops)
        assert response.status_code == 200, (operation_id, response.text)
        TALLY["lower role: allowed controls"] += 1
    assert w.call("GET", "/api/v1/billing/balance", w.a.token).json() == balance


# ---- tenant and project roles -----------------------------------------------------------
def events(w: World) -> int:
    """Every row of the event log, idempotency records included."""
    recorder = w.stores.app.recorder
    with w.stores.query_pool.connection() as conn:
        row = conn.execute(SQL("SELECT count(*) AS n FROM {0}.{1}").format(
            Identifier(recorder.datastore.schema),
            Identifier(recorder.events_table_name))).fetchone()
    return row["n"] if isinstance(row, dict) else row[0]


#: operations only operators may call (docs/decisions.md: entitlement upserts), which
#: refuse a project's viewer and member alike (``test_a_project_member_is_not_…``)
OPERATOR_ONLY = {"upsertProjectAppEntitlement", "upsertV3AccessAppEntitlement"}
PROJECT_MUTATIONS = [op for op in SCOPED if scope_of(op) in ("header", "project")
                     and ROUTES[op][0] != "GET" and canonical(op) not in REPORTS | OPERATOR_ONLY]
#: bodies that launch in A's project as its member (no placement on A's allocations)
ROLE_BODIES: dict[str, Any] = {
    "submitV3AppLaunch": {"app_version": "1"}, "precheckV3AppLaunch": {"app_version": "1"},
    "createAppInstance": {"app_slug": "<slug>", "app_version": "1", "display_name": "roles"},
}
#: what the member's request answers when it is not 202: a fresh allocation is
#: ``requested`` until a node agent reports it active, and only an active one restarts
MEMBER_STATUS = {"createAllocation": (201, None), "precheckV3ComputeLaunch": (200, None),
                 "precheckV3AppLaunch": (200, None),
                 "restartAllocation": (409, "allocation_not_active")}
INSTANCE = "/api/v1/projects/{project_id}/app-instances/{app_instance_id}"
#: what an app instance goes through before the operation can apply to it
PREPARE = {"start": [("stop", None)],
           "rollback": [("upgrade", {"app_version": "2"}), ("report", {"status": "running"})]}


def fresh_allocation(w: World) -> str:
    made = w.ok("POST", "/api/v1/allocations", w.a.token, 201, project=w.a.project,
                key=uuid.uuid4().hex, body=fill(BODIES["createAllocation"], {"sku": w.skus[0]}))
    return made["allocation"]["id"]


def fresh_instance(w: World, action: str) -> str:
    """A running app instance of A's project (made by A's owner, reported by the
    adapter), taken to where ``action`` applies."""
    a = w.a
    made = w.ok("POST", "/api/v1/projects/{project_id}/app-instances", a.token, 202,
                project_id=a.project, key=uuid.uuid4().hex,
                body={"app_slug": w.slugs[0], "app_version": "1", "display_name": "roles"})
    where = {"project_id": a.project, "app_instance_id": made["id"]}
    w.ok("POST", INSTANCE + "/report", a.adapter, body={"status": "running"}, **where)
    for step, body in PREPARE.get(action, []):
        if step == "report":
            w.ok("POST", INSTANCE + "/report", a.adapter, body=body, **where)
        else:
            w.ok("POST", INSTANCE + "/" + step, a.token, 202, key=uuid.uuid4().hex, body=body,
                 **where)
    return made["id"]


def test_the_role_matrix_covers_every_project_mutation() -> None:
    """Every tenant-called operation that is not a read and names a project is in the
    viewer matrix, the adapter's reports or the operators' entitlement upserts."""
    tenant_writes = {op for op in SCOPED if scope_of(op) in ("header", "project")
                     and ROUTES[op][0] != "GET"}
    assert tenant_writes == set(PROJECT_MUTATIONS) | {
        op for op in tenant_writes if canonical(op) in REPORTS | OPERATOR_ONLY}
    assert len(PROJECT_MUTATIONS) >= 30


@pytest.mark.parametrize("operation_id", PROJECT_MUTATIONS)
def test_a_project_viewer_is_refused_every_mutation_a_member_may_make(
        w: World, operation_id: str) -> None:
    """A's user as the project's ``viewer`` (a tenant ``member``): 403
    ``insufficient_permissions`` on a resource that exists, before anything is read or
    written (not even an idempotency record); the same person as ``member``: the
    domain's answer, which is the operation's success (for a restart, the allocation's
    state refusal: it is not active yet)."""
    TALLY["roles: project mutations"] += 1
    a = w.a
    viewer = a.person(tenant_role="member", project_role="viewer")
    member = a.person(tenant_role="member", project_role="member")
    method, template = ROUTES[operation_id]
    # the resource is made first, then the log is counted around the viewer's request
    names = path_names(operation_id)
    values: dict[str, Any] = {"project_id": a.project, "app_slug": w.slugs[0]}
    if "allocation_id" in names:
        values["allocation_id"] = fresh_allocation(w)
    if "app_instance_id" in names:
        values["app_instance_id"] = fresh_instance(w, template.rsplit("/", 1)[-1])
    op = canonical(operation_id)
    body = fill(ROLE_BODIES.get(op, BODIES.get(op)), {"sku": w.skus[0], "slug": w.slugs[0]})
    path = {n: v for n, v in values.items() if n in names}

    def send(token: str) -> httpx.Response:
        return w.call(method, template, token, project=a.project, key=uuid.uuid4().hex,
                      body=body if body is not None else {}, **path)

    before = events(w)
    refused = send(viewer)
    assert refused.status_code == 403, (operation_id, refused.text)
    assert refusal(refused)["code"] == "insufficient_permissions", refused.text
    assert events(w) == before, f"{operation_id} wrote for a viewer"
    assert not leaks(w, refused, {str(v) for v in values.values()}, {"tenant", "project"})
    TALLY["roles: refusals"] += 1
    allowed = send(member)
    status, code = MEMBER_STATUS.get(op, (202, None))
    assert allowed.status_code == status, (operation_id, allowed.text)
    if code is not None:
        assert refusal(allowed)["code"] == code, allowed.text
    TALLY[f"roles: member answers {status}"] += 1


def test_launches_check_the_callers_project_role_against_launch_roles(w: World) -> None:
    """An entitlement whose ``launch_roles`` are owner and admin: A's member is refused
    the create and the V3 submit (403 ``insufficient_permissions``,
    ``launch_role_required``, nothing written) and sees it as the precheck's
    entitlement blocker; A's project admin launches."""
    a, slug = w.a, w.slugs[1]
    w.ok("PUT", "/api/v1/projects/{project_id}/apps/entitlements/{app_slug}", w.admin,
         project_id=a.project, app_slug=slug, key=uuid.uuid4().hex,
         body={"enabled": True, "policy_overrides": {"launch_roles": ["owner", "admin"]}})
    member = a.person(tenant_role="member", project_role="member")
    admin = a.person(tenant_role="member", project_role="admin")
    create = ("POST", "/api/v1/projects/{project_id}/app-instances",
              {"app_slug": slug, "app_version": "1", "display_name": "roles"})
    submit = ("POST", "/api/v1/launch/apps/{app_slug}", {"app_version": "1"})
    before = events(w)
    for method, template, body in (create, submit):
        refused = w.call(method, template, member, project=a.project, key=uuid.uuid4().hex,
                         body=body, project_id=a.project, app_slug=slug)
        assert refused.status_code == 403, (template, refused.text)
        assert (refusal(refused)["code"], refused.json()["details"]["reason"]) == \
            ("insufficient_permissions", "launch_role_required"), refused.text
        TALLY["roles: refusals"] += 1
    assert events(w) - before == 2  # the refusals' idempotency records, no domain event
    checks = w.ok("POST", "/api/v1/launch/apps/{app_slug}/precheck", member, project=a.project,
                  app_slug=slug, body={"app_version": "1"})["checks"]
    assert {c["id"]: c["status"] for c in checks}["entitlement"] == "blocker"
    for method, template, body in (create, submit):
        w.ok(method, template, admin, 202, project=a.project, key=uuid.uuid4().hex, body=body,
             project_id=a.project, app_slug=slug)


#: the audit lists "visible to project administrators" and their V3 evidence twins
PROJECT_AUDIT = ["listProjectAuditLogs", "listV3ProjectEvidenceAuditLogs",
                 "listV3ProjectEvidenceAuditLogsCompat"]
#: the audit lists "visible to tenant administrators" and their V3 evidence twins
TENANT_AUDIT = ["listOrgAuditLogs", "listV3TenantEvidenceAuditLogs",
                "listV3TenantEvidenceAuditLogsCompat"]
#: caller -> (tenant role, project role or None for no membership of A's project,
#: platform roles, may read the project lists, may read the tenant lists)
AUDIT_CALLERS: dict[str, tuple[str, str | None, list[str], bool, bool]] = {
    "project owner": ("member", "owner", [], True, False),
    "project admin": ("member", "admin", [], True, False),
    "project member": ("member", "member", [], False, False),
    "project viewer": ("member", "viewer", [], False, False),
    "tenant owner": ("owner", "member", [], True, True),
    "tenant admin": ("admin", "member", [], True, True),
    "tenant admin, viewer of the project": ("admin", "viewer", [], True, True),
    "tenant billing_viewer": ("billing_viewer", "member", [], False, False),
    "tenant admin, not in the project": ("admin", None, [], False, True),
    "platform auditor in the project": ("member", "member", ["platform_ops"], True, True),
}


def audit_caller(w: World, caller: str) -> str:
    tenant_role, project_role, platform_roles, *_ = AUDIT_CALLERS[caller]
    projects = [] if project_role is None else [str(w.a.project)]
    return mint_token(w.secret, user_id=uuid.uuid4(), tenant_id=w.a.tenant,
                      tenant_role=tenant_role, project_ids=projects,
                      project_roles={w.a.project: project_role} if project_role else None,
                      platform_roles=platform_roles)


def audit_request(w: World, operation_id: str, token: str) -> httpx.Response:
    method, template = ROUTES[operation_id]
    headers = {"X-Tenant-ID": str(w.a.tenant)} if "evidence" in template and \
        operation_id in TENANT_AUDIT else None
    return w.call(method, template, token, query={"page_size": 200}, headers=headers,
                  project=w.a.project if "ProjectIdHeader" in parameters(operation_id)
                  else None, project_id=w.a.project, org_id=w.a.tenant)


@pytest.mark.parametrize("operation_id, caller",
                         [(op, c) for op in PROJECT_AUDIT + TENANT_AUDIT for c in AUDIT_CALLERS])
def test_audit_lists_are_for_administrators(w: World, operation_id: str, caller: str) -> None:
    """A project's audit lists answer its owners and admins (a tenant owner or admin is
    that in each project it belongs to) and platform auditors; a tenant's, its owners
    and admins and platform auditors: exactly the rows A's owner sees. Anyone else of
    A's gets 403 ``insufficient_permissions`` with nothing of A's in it."""
    TALLY["roles: audit list calls"] += 1
    *_, reads_project, reads_tenant = AUDIT_CALLERS[caller]
    allowed = reads_project if operation_id in PROJECT_AUDIT else reads_tenant
    owner = audit_request(w, operation_id, w.a.token)
    assert owner.status_code == 200, owner.text
    assert owner.json()["items"], operation_id
    answer = audit_request(w, operation_id, audit_caller(w, caller))
    if allowed:
        assert answer.status_code == 200, (operation_id, caller, answer.text)
        assert [i["id"] for i in answer.json()["items"]] == \
            [i["id"] for i in owner.json()["items"]]
        return
    assert answer.status_code == 403, (operation_id, caller, answer.text)
    body = refusal(answer)
    assert body["code"] == "insufficient_permissions", answer.text
    if AUDIT_CALLERS[caller][1] is None:  # not a member: the scope's refusal, as for anyone
        assert body["message"] == "no access to this project", answer.text
    else:
        assert "role" in body["message"], answer.text
    assert not leaks(w, answer, known={"tenant", "project"}), answer.text
    TALLY["roles: refusals"] += 1


def test_a_demoted_administrator_is_not_served_the_cached_audit_list(w: World) -> None:
    """The same person, first the tenant's admin (its answer cached), then a member: 403."""
    user = uuid.uuid4()
    for role, status in (("admin", 200), ("member", 403), ("admin", 200)):
        token = mint_token(w.secret, user_id=user, tenant_id=w.a.tenant, tenant_role=role,
                           project_ids=[str(w.a.project)])
        assert audit_request(w, "listOrgAuditLogs", token).status_code == status, role


def test_a_caller_without_a_tenant_administers_only_their_personal_org(w: World) -> None:
    """No tenant: the caller is the one person, the owner, of their personal org; A's
    org stays the scope's 403."""
    from domain.admission import personal_org_id

    user = uuid.uuid4()
    token = mint_token(w.secret, user_id=user)
    template = "/api/v1/orgs/{org_id}/audit-logs"
    assert w.call("GET", template, token, org_id=personal_org_id(user)).status_code == 200
    refused = w.call("GET", template, token, org_id=w.a.tenant)
    assert (refused.status_code, refusal(refused)["message"]) == \
        (403, "no access to this organization")


#: billing operations (caller-scoped or tenant-wide) and the side-effect-free POST
BILLING = sorted(op for op, (_, path) in ROUTES.items() if path.startswith("/api/v1/billing/")
                 or path == "/api/v1/payments/checkout-session")
BILLING_READS = [op for op in BILLING
                 if ROUTES[op][0] == "GET" or op == "evaluateBillingBudgetDecision"]
BILLING_MUTATIONS = [op for op in BILLING if op not in BILLING_READS]
BILLING_PATH = {"invoice_id": "invoice", "rated_usage_line_id": "rated_line"}


def billing_request(w: World, operation_id: str, token: str,
                    key: str | None = None) -> httpx.Response:
    method, template = ROUTES[operation_id]
    path = {n: w.a.ids[BILLING_PATH[n]] for n in path_names(operation_id)}
    body = fill(BODIES.get(operation_id), {"project": str(w.a.project)})
    return w.call(method, template, token, body=body, key=key, **path)


def test_the_billing_operations_are_known() -> None:
    assert BILLING_MUTATIONS == ["createChargeSession"]
    assert len(BILLING_READS) == 13


@pytest.mark.parametrize("operation_id", BILLING_READS)
def test_a_billing_viewer_reads_billing_as_the_owner_does(w: World, operation_id: str) -> None:
    """A's user as the tenant's ``billing_viewer``: the very answer A's owner gets."""
    TALLY["roles: billing reads"] += 1
    owner = billing_request(w, operation_id, w.a.token)
    viewer = billing_request(w, operation_id, w.a.person(tenant_role="billing_viewer"))
    assert owner.status_code == 200, owner.text
    assert viewer.status_code == 200, (operation_id, viewer.text)
    assert normalised(viewer, {}) == normalised(owner, {}), operation_id
    if operation_id == "listBillingInvoices":  # the answers are A's, not empty ones
        assert w.a.ids["invoice"] in viewer.text


@pytest.mark.parametrize("operation_id", BILLING_MUTATIONS)
def test_a_billing_viewer_may_not_act_on_the_tenants_account(w: World,
                                                             operation_id: str) -> None:
    """403 ``insufficient_permissions`` before anything is written; a tenant member (no
    role claim) and the owner are served."""
    TALLY["roles: billing mutations"] += 1
    before = events(w)
    refused = billing_request(w, operation_id, w.a.person(tenant_role="billing_viewer"),
                              key=uuid.uuid4().hex)
    assert refused.status_code == 403, refused.text
    assert refusal(refused)["code"] == "insufficient_permissions", refused.text
    assert events(w) == before
    TALLY["roles: refusals"] += 1
    for token in (w.a.member_token, w.a.person(tenant_role="owner")):
        assert billing_request(w, operation_id, token, key=uuid.uuid4().hex).status_code == 200


UNKNOWN_ROLES = {"tenant role": {"tenant_role": "superuser"},
                 "project role": {"project_roles": {"<project>": "root"}}}


def test_an_unknown_role_value_is_an_invalid_token(w: World) -> None:
    """A token naming a role outside the contract's lists is 401 ``token_invalid`` on
    every operation that takes a bearer token, before anything else."""
    before = events(w)
    for operation_id in sorted(set(ROUTES) - {"getHealth", "stripeWebhook"}):
        method, template = ROUTES[operation_id]
        path = {n: uuid.uuid4() for n in path_names(operation_id)}
        for claims in UNKNOWN_ROLES.values():
            token = mint_token(w.secret, user_id=w.a.user, tenant_id=w.a.tenant,
                               project_ids=[str(w.a.project)],
                               **fill(claims, {"project": str(w.a.project)}))
            response = w.call(method, template, token, project=w.a.project, checked=False,
                              body={} if method in ("POST", "PUT", "PATCH") else None, **path)
            assert response.status_code == 401, (operation_id, response.text)
            assert refusal(response)["code"] == "token_invalid", response.text
            TALLY["roles: unknown role refusals"] += 1
    assert events(w) == before


# ---- lists and queries in B's own scope -------------------------------------------------
#: B's own resource a list must show (the list is not trivially empty)
B_SEES = {"listAllocations", "listProjectAllocations", "listOrgAllocations", "listV3Workloads",
          "listV3WorkloadsCompat"}


@pytest.mark.parametrize("operation_id, caller",
                         [(op, "other tenant") for op in READS]
                         + [(op, "same tenant") for op in READS if project_private(op)])
def test_a_list_or_query_in_the_callers_scope_holds_nothing_of_as(
        w: World, operation_id: str, caller: str) -> None:
    """A asks first (so a cached answer could be served to the wrong caller), then B or
    N in its own scope: 200, with none of A's identifiers."""
    TALLY[f"reads ({caller}): operations"] += 1
    them = getattr(w, CALLERS[caller])
    answers = []
    for tenant in (w.a, them):
        values = {n: str(uuid.uuid4()) for n in slots(operation_id)}
        values["project"] = str(tenant.project)
        answers.append(Probe(w, operation_id, tenant.token,
                             own_scope(w, operation_id, tenant)).send(values, query={}))
        assert answers[-1].status_code == 200, (operation_id, tenant.name, answers[-1].text)
    theirs, answer = answers
    known = {"tenant"} if them is w.n else set()
    assert not leaks(w, answer, known=known), (leaks(w, answer, known=known), answer.text)
    if operation_id in B_SEES and them is w.b:  # the detector sees A's rows in A's answer, B's in B's
        assert leaks(w, theirs) and w.a.ids["allocation"] in theirs.text
        assert w.b.ids["allocation"] in answer.text


def test_a_changed_membership_is_not_served_from_the_cache(w: World) -> None:
    """The same user, first a member of A's project, then no longer (a new token): the
    project's budget must not be served from what the first token's answer cached."""
    a = w.a
    member = mint_token(w.secret, user_id=a.member, tenant_id=a.tenant,
                        project_ids=[str(a.project)])
    former = mint_token(w.secret, user_id=a.member, tenant_id=a.tenant, project_ids=[])
    template = "/api/v1/billing/budget-posture"
    seen = w.call("GET", template, member).json()["items"]
    assert a.ids["budget_project"] in {item["id"] for item in seen}
    after = w.call("GET", template, former).json()["items"]
    assert a.ids["budget_project"] not in {item["id"] for item in after}, after
    assert a.ids["budget_tenant"] in {item["id"] for item in after}


# ---- cursors ----------------------------------------------------------------------------
CURSOR_QUERY = {"getAllocationTimeline": "limit"}
PAGED = [op for op in SCOPED if scope_of(op) != "operator"
         and ({"PageSize", "page_size"} & set(parameters(op)) or op in CURSOR_QUERY)
         and set(tenant_slots(op)) <= {"allocation_id", "app_instance_id"}]


def next_cursor(response: httpx.Response) -> str | None:
    body = response.json()
    return body.get("next_cursor", body.get("pagination", {}).get("next_cursor"))


@pytest.mark.parametrize("operation_id", PAGED)
def test_as_cursor_is_refused_to_b(w: World, operation_id: str) -> None:
    """A's next-page cursor works for A; B presenting it (in B's scope or naming A's)
    gets ``400 invalid_request`` ``cursor_mismatch`` (or A's scope's 403), never a page."""
    TALLY["cursors: operations"] += 1
    size = CURSOR_QUERY.get(operation_id, "page_size")
    values = {n: w.secrets[n] for n in slots(operation_id)}

    def page(token: str, scope: dict[str, str], cursor: str | None = None) -> httpx.Response:
        query = {size: 1, **({"cursor": cursor} if cursor else {})}
        return Probe(w, operation_id, token, scope).send(values, query=query)

    first = page(w.a.token, own_scope(w, operation_id, w.a))
    assert first.status_code == 200, first.text
    cursor = next_cursor(first)
    assert cursor, (operation_id, first.text)
    assert page(w.a.token, own_scope(w, operation_id, w.a), cursor).status_code == 200
    for who, scope in (("own", own_scope(w, operation_id, w.b)),
                       ("A's", own_scope(w, operation_id, w.a))):
        answer = page(w.b.token, scope, cursor)
        assert answer.status_code in (400, 403, 404), (operation_id, who, answer.text)
        body = refusal(answer)
        if who == "own" or answer.status_code == 400:
            assert answer.status_code == 400, (operation_id, who, answer.text)
            assert (body["code"], body["details"]["reason"]) == \
                ("invalid_request", "cursor_mismatch"), answer.text
        assert not leaks(w, answer, set(values.values()) | {str(w.a.project), str(w.a.tenant)})


# ---- idempotency keys -------------------------------------------------------------------
def test_as_idempotency_key_gives_b_its_own_outcome(w: World) -> None:
    """B sends A's keys with A's bodies: a fresh outcome of B's own each time (and B's
    replay is B's); A's replays still answer A's first responses."""
    b, mine = w.b, {}
    for name, spec in keyed_requests(w).items():
        path = {"project_id": b.project} if "path" in spec else {}
        fresh = w.call(spec["method"], spec["template"], b.token, project=b.project,
                       body=spec["body"], key=key_of(name), **path)
        assert fresh.status_code == spec["status"], (name, fresh.text)
        assert "Idempotent-Replayed" not in fresh.headers, name
        assert not leaks(w, fresh), (name, leaks(w, fresh), fresh.text)
        assert fresh.json() != w.keyed[name][1]
        again = w.call(spec["method"], spec["template"], b.token, project=b.project,
                       body=spec["body"], key=key_of(name), **path)
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json() == fresh.json(), name
        mine[name] = fresh.json()
        TALLY["idempotency: keys reused by B"] += 1
    # the compat twin shares the operation's key scope: B's own launch again, not A's
    compat = w.call("POST", "/api/v1/v3/launch/compute", b.token, project=b.project,
                    body=keyed_requests(w)["launch"]["body"], key=key_of("launch"))
    assert (compat.status_code, compat.json()) == (202, mine["launch"]), compat.text
    release = "/api/v1/allocations/{allocation_id}/release"
    for project, status in ((b.project, 404), (w.a.project, 403)):
        stolen = w.call("POST", release, b.token, project=project, key=key_of("release"),
                        allocation_id=w.a.ids["workload"])
        assert stolen.status_code == status, stolen.text
        assert "Idempotent-Replayed" not in stolen.headers
    replays = dict(keyed_requests(w), release={"method": "POST", "template": release,
                                               "body": None,
                                               "path": {"allocation_id": w.a.ids["workload"]}})
    for name, spec in replays.items():
        replay = w.call(spec["method"], spec["template"], w.a.token, project=w.a.project,
                        body=spec["body"], key=key_of(name), **spec.get("path", {}))
        assert (replay.status_code, replay.json()) == w.keyed[name], name
        assert replay.headers.get("Idempotent-Replayed") == "true", name
        TALLY["idempotency: A's replays"] += 1


# ---- input limits -----------------------------------------------------------------------
def limits_caller(w: World) -> str:
    """A platform superadmin who is a member of A's project and has no balance: past
    authorization and scope everywhere, and unable to launch anything."""
    return mint_token(w.secret, user_id=uuid.uuid4(), tenant_id=w.a.tenant, role="admin",
                      platform_roles=["platform_superadmin"], project_ids=[str(w.a.project)])


KEYED = sorted(op for op in ROUTES if "IdempotencyKey" in parameters(op))
#: valid bodies of the keyed operations not in ``BODIES`` (operators' and the webhook's)
SKU = {k: v for k, v in sku_body("limits-sku").items() if k != "sku"}
OPERATOR_BODIES: dict[str, Any] = {
    "adminAdjustBalance": {"direction": "credit", "amount_minor": 1, "currency": "USD",
                           "reason": "limits"},
    "adminCreateNode": {"host": "10.99.99.99", "sku": "<sku>", "gpus_total": 8, "probe": False},
    "adminCreateRefund": {"amount_minor": 1, "currency": "USD", "reason": "limits"},
    "createV3PlatformFinanceUserRefund": {"amount_minor": 1, "currency": "USD",
                                          "reason": "limits"},
    "adminCreateSku": {"sku": "limits-sku", **SKU},
    "createV3PlatformConfigSku": {"sku": "limits-sku", **SKU},
    "adminUpdateSku": SKU, "updateV3PlatformConfigSku": SKU,
    "adminForceCleanupAllocation": {"reason": "limits"},
    "adminForceReleaseAllocation": {"reason": "limits"},
    "adminReconcilePaymentSession": {"action": "mark_failed", "reason": "limits"},
    "reconcileV3PlatformFinancePaymentSession": {"action": "mark_failed", "reason": "limits"},
    "adminSetAllocationConcurrencyPolicy": {"value": 50},
    "setV3PlatformConfigAllocationConcurrencyPolicy": {"value": 50},
    "adminSetFinancialRestriction": {"state": "healthy", "reason": "limits"},
    "adminUpsertNodeResourceSlots": {"slots": [{"slot_index": 0, "status": "disabled",
                                                "capacity_shape": "gpu_slice"}]},
    "upsertV3PlatformNodeResourceSlots": {"slots": [{"slot_index": 0, "status": "disabled",
                                                     "capacity_shape": "gpu_slice"}]},
}


@pytest.mark.parametrize("operation_id", KEYED)
def test_an_empty_or_over_long_idempotency_key_is_refused(w: World, operation_id: str) -> None:
    """Every operation declaring ``Idempotency-Key`` refuses an empty one and one of 129
    characters (400 naming the header), and appends nothing."""
    TALLY["idempotency key limits: operations"] += 1
    method, template = ROUTES[operation_id]
    op = canonical(operation_id)
    body = fill(BODIES.get(op, OPERATOR_BODIES.get(op)), {
        **w.secrets, "sku": w.skus[0], "slug": w.slugs[0]})
    path = {n: {"project_id": w.a.project, "app_slug": w.slugs[0], "sku": w.skus[0],
                "version": "1", "node_id": uuid.uuid4(), "scope_type": "project",
                "stream_seq": "1"}.get(n, uuid.uuid4()) for n in path_names(operation_id)}
    before = appended(w.stores)
    for key in ("", "k" * 129):
        if operation_id == "stripeWebhook":
            response = w.webhook({"id": f"evt_{uuid.uuid4().hex}", "type": "customer.created",
                                  "data": {}}, headers={"Idempotency-Key": key})
        else:
            response = w.call(method, template, limits_caller(w), project=w.a.project, key=key,
                              body=body if body is not None else
                              ({} if method in ("POST", "PUT", "PATCH") else None), **path)
        assert response.status_code == 400, (operation_id, len(key), response.text)
        details = refusal(response).get("details", {})
        assert "Idempotency-Key" in json.dumps(details), (operation_id, response.text)
    assert appended(w.stores) == before


def max_length_fields() -> list[tuple[str, str, int]]:
    """(operation, dotted body field, maxLength) for every request-body string property
    with a ``maxLength`` in the contract, of every implemented operation."""
    schemas = contract()["components"]["schemas"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schemas[node["$ref"].rsplit("/", 1)[1]]
        return node

    found = []
    for operation_id, (method, path) in sorted(ROUTES.items()):
        body = contract()["paths"][path][method.lower()].get("requestBody")
        if not body:
            continue
        stack = [("", resolve(body["content"]["application/json"]["schema"]))]
        while stack:
            prefix, node = stack.pop()
            for name, prop in node.get("properties", {}).items():
                prop = resolve(prop)
                if prop.get("type") == "string" and "maxLength" in prop:
                    found.append((operation_id, prefix + name, prop["maxLength"]))
                elif "properties" in prop:
                    stack.append((prefix + name + ".", prop))
    return found


@pytest.mark.parametrize("operation_id, field, limit", max_length_fields())
def test_a_body_string_over_its_max_length_is_refused(w: World, operation_id: str, field: str,
                                                       limit: int) -> None:
    """maxLength + 1 characters → 400 ``validation_error`` naming the field; exactly
    maxLength is not refused for it."""
    TALLY["max length: fields"] += 1
    method, template = ROUTES[operation_id]
    op = canonical(operation_id)
    base = fill(BODIES.get(op, OPERATOR_BODIES.get(op)), {"sku": w.skus[0], "slug": w.slugs[0]})
    path = {"app_instance_id": uuid.uuid4()} if "{app_instance_id}" in template else {}
    if "{project_id}" in template:
        path["project_id"] = w.a.project
    token = limits_caller(w)
    answers = {}
    for length in (limit + 1, limit):
        body = json.loads(json.dumps(base))
        target = body
        *parents, leaf = field.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = "x" * length
        answers[length] = w.call(method, template, token, project=w.a.project, body=body,
                                 key=uuid.uuid4().hex, **path)
    over, at = answers[limit + 1], answers[limit]
    assert over.status_code == 400, (operation_id, field, over.text)
    assert refusal(over)["code"] == "validation_error"
    assert leaf in json.dumps(over.json().get("details")), over.text
    assert not (at.status_code == 400 and leaf in json.dumps(at.json().get("details"))), at.text
