"""Bearer JWT (HS256) authentication, capabilities and project scoping.

Claims: ``sub`` (user or service-account uuid), ``tenant_id``, ``tenant_role``
(``owner``|``admin``|``member``|``billing_viewer``, ``member`` when absent),
``project_ids`` (the caller's project memberships), ``project_roles`` (project id →
``owner``|``admin``|``member``|``viewer``; each is a membership too, and a project
without a role there is ``member``), ``project_id`` (a service account's one project),
``role`` (``user``|``admin``), ``platform_roles``, ``capabilities``, ``actor_type``
(``user``|``service_account``|``node``), ``exp``. An unknown role value is 401
``token_invalid``. A ``node`` token is a node agent's: its ``sub`` is the node id, it
carries no role, and it is good only for that node's ``/internal`` task channel
(docs/decisions.md: it stands in for the contract's mTLS).

Order of checks (api-conventions §2.5): 401 for the token, 400 for a malformed
``X-Project-ID``, 403 for the scope (membership), then 403 ``insufficient_permissions``
for a role too low — before any resource is looked up. Roles (docs/decisions.md): a
project ``viewer`` only reads (``project_access``); a tenant ``owner``/``admin`` is at
least ``owner``/``admin`` in every project they belong to; a ``billing_viewer`` reads
the tenant's billing but does not act on its account (``billing_writer``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from fastapi import Request

from api.errors import ApiError

ISSUER = "ledgercore"
ALL_CAPABILITIES = ("platform.admin", "platform.ops.read", "platform.ops.write",
                    "platform.ops.runbook.read", "platform.node.read", "platform.audit.read")
ROLE_CAPABILITIES = {
    "platform_superadmin": ALL_CAPABILITIES,
    "platform_ops": ("platform.ops.read", "platform.ops.write", "platform.ops.runbook.read",
                     "platform.node.read", "platform.audit.read"),
    "platform_user": (),
}
TENANT_ROLES = ("owner", "admin", "member", "billing_viewer")
#: project roles, highest first
PROJECT_ROLES = ("owner", "admin", "member", "viewer")
#: the project role a tenant role gives in every project of the tenant its holder is in
TENANT_ROLE_IN_PROJECTS = {"owner": "owner", "admin": "admin"}
#: methods that change nothing: all a project ``viewer`` may send
READ_METHODS = frozenset({"GET", "HEAD"})
#: the project roles that may send a project-scoped request that is not a read
PROJECT_WRITERS = ("owner", "admin", "member")
#: the tenant roles that may act on the tenant's billing account
BILLING_WRITERS = ("owner", "admin", "member")


@dataclass(frozen=True)
class Principal:
    user_id: uuid.UUID
    tenant_id: uuid.UUID | None
    role: str
    actor_type: str
    project_ids: frozenset[uuid.UUID]
    token_project_id: uuid.UUID | None
    platform_roles: tuple[str, ...]
    capabilities: frozenset[str]
    tenant_role: str = "member"
    #: the roles other than ``member`` the token names, sorted by project
    project_roles: tuple[tuple[uuid.UUID, str], ...] = ()

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def project_role(self, project: uuid.UUID) -> str:
        """The caller's role in ``project`` (one they belong to): the token's role there
        (``member`` when it names none), raised by a tenant ``owner``/``admin`` role."""
        own = dict(self.project_roles).get(project, "member")
        lifted = TENANT_ROLE_IN_PROJECTS.get(self.tenant_role, own)
        return min(own, lifted, key=PROJECT_ROLES.index)

    @property
    def scope_key(self) -> str:
        """Everything that changes what this caller may see, for cache keys and cursor
        bindings: identity, tenant, roles (platform, tenant and project), capabilities and
        project memberships."""
        roles = ",".join(sorted(self.platform_roles))
        caps = ",".join(sorted(self.capabilities))
        projects = ",".join(sorted(str(p) for p in self.project_ids))
        project_roles = ",".join(f"{p}={r}" for p, r in self.project_roles)
        return (f"{self.actor_type}:{self.user_id}:{self.tenant_id or '-'}:{self.role}:{roles}:"
                f"{caps}:{projects}:{self.token_project_id or '-'}:{self.tenant_role}:"
                f"{project_roles}")


def mint_token(secret: str, *, user_id: uuid.UUID | str, tenant_id: uuid.UUID | str | None = None,
               project_ids: list[str] | None = None, project_id: str | None = None,
               role: str = "user", platform_roles: list[str] | None = None,
               actor_type: str = "user", ttl_seconds: int = 3600,
               capabilities: list[str] | None = None, tenant_role: str | None = None,
               project_roles: dict[Any, str] | None = None) -> str:
    """A signed token; ``tenant_role`` and ``project_roles`` (project id → role) are
    left out when not given (``member``, as for a token minted before roles)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER, "sub": str(user_id), "iat": now, "exp": now + ttl_seconds,
        "role": role, "actor_type": actor_type,
        "platform_roles": platform_roles or [], "project_ids": project_ids or [],
    }
    if tenant_id:
        claims["tenant_id"] = str(tenant_id)
    if project_id:
        claims["project_id"] = str(project_id)
    if capabilities:
        claims["capabilities"] = capabilities
    if tenant_role is not None:
        claims["tenant_role"] = tenant_role
    if project_roles is not None:
        claims["project_roles"] = {str(p): r for p, r in project_roles.items()}
    return jwt.encode(claims, secret, algorithm="HS256")


def _uuid(value: Any) -> uuid.UUID:
    return uuid.UUID(str(value))


def _tenant_role(claims: dict[str, Any]) -> str:
    role = claims.get("tenant_role")
    if role is None:
        return "member"
    if not isinstance(role, str) or role not in TENANT_ROLES:
        raise ValueError("unknown tenant role")
    return role


def _project_roles(claims: dict[str, Any]) -> dict[uuid.UUID, str]:
    given = claims.get("project_roles")
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ValueError("project_roles must be an object")
    roles: dict[uuid.UUID, str] = {}
    for project, role in given.items():
        if not isinstance(role, str) or role not in PROJECT_ROLES:
            raise ValueError("unknown project role")
        if roles.setdefault(_uuid(project), role) != role:
            raise ValueError("two roles for one project")
    return roles


#: tokens already verified: (secret, token) → (principal, valid from, valid until), the
#: window in the token's own whole seconds.
#: A token's signature and claims never change, so only its time window is checked
#: again; what fails verification is never kept.
_verified: dict[tuple[str, str], tuple[Principal, int, int]] = {}
MAX_VERIFIED = 8192


def principal_from_token(token: str, secret: str) -> Principal:
    known = _verified.get((secret, token))
    if known is not None:
        principal, valid_from, valid_until = known
        now = time.time()
        if valid_from <= now < valid_until:
            return principal
        if now >= valid_until:
            raise ApiError(401, "token_expired", "the bearer token has expired")
    principal, valid_from, valid_until = _verify(token, secret)
    if len(_verified) >= MAX_VERIFIED:
        _verified.pop(next(iter(_verified)))
    _verified[(secret, token)] = (principal, valid_from, valid_until)
    return principal


def _verify(token: str, secret: str) -> tuple[Principal, int, int]:
    """The token's caller and the window in which the token holds (PyJWT's own rules:
    not before ``nbf`` or ``iat``, until ``exp`` exclusive); 401 if it does not hold now."""
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], issuer=ISSUER,
                            options={"require": ["exp", "sub", "iss"]})
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "token_expired", "the bearer token has expired") from None
    except jwt.PyJWTError:
        raise ApiError(401, "token_invalid", "the bearer token is not valid") from None
    try:
        role = str(claims.get("role", "user"))
        platform_roles = tuple(str(r) for r in claims.get("platform_roles", []))
        capabilities = set(str(c) for c in claims.get("capabilities", []))
        for platform_role in platform_roles:
            capabilities.update(ROLE_CAPABILITIES.get(platform_role, ()))
        if role == "admin":
            capabilities.update(ALL_CAPABILITIES)
        actor_type = str(claims.get("actor_type", "user"))
        if actor_type not in ("user", "service_account", "node") or role not in ("user", "admin"):
            raise ValueError("unknown actor type or role")
        if actor_type == "node" and (role != "user" or capabilities or platform_roles
                                     or "tenant_role" in claims or "project_roles" in claims):
            raise ValueError("unknown actor type or role")
        project_roles = _project_roles(claims)
        principal = Principal(
            user_id=_uuid(claims["sub"]),
            tenant_id=_uuid(claims["tenant_id"]) if claims.get("tenant_id") else None,
            role=role,
            actor_type=actor_type,
            project_ids=frozenset(_uuid(p) for p in claims.get("project_ids", []))
            | frozenset(project_roles),
            token_project_id=_uuid(claims["project_id"]) if claims.get("project_id") else None,
            platform_roles=platform_roles,
            capabilities=frozenset(capabilities),
            tenant_role=_tenant_role(claims),
            project_roles=tuple(sorted((p, r) for p, r in project_roles.items()
                                       if r != "member")),
        )
        # PyJWT has checked ``exp``, ``nbf`` and ``iat`` are whole seconds
        valid_from = max(int(claims.get("nbf", 0)), int(claims.get("iat", 0)))
        return principal, valid_from, int(claims["exp"])
    except (KeyError, TypeError, ValueError):
        raise ApiError(401, "token_invalid", "the bearer token's claims are not valid") from None


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the caller, or 401; a node agent's token is good for nothing
    but its task channel (403). (Async: it does no I/O, so it runs on the event loop
    instead of costing a thread hand-off per request.)"""
    principal = _bearer(request)
    if principal.actor_type == "node":
        raise ApiError(403, "insufficient_permissions", "a node token only serves the node task channel")
    return principal


def _bearer(request: Request) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise ApiError(401, "token_missing", "a bearer token is required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "token_invalid", "the Authorization header must be 'Bearer <token>'")
    return principal_from_token(token.strip(), request.app.state.settings.jwt_secret)


def require(principal: Principal, capability: str) -> None:
    if not principal.can(capability):
        code = "admin_required" if capability == "platform.admin" else "insufficient_permissions"
        raise ApiError(403, code, f"this operation needs the {capability} capability")


def requires(capability: str) -> Callable[[Request], Awaitable[Principal]]:
    """FastAPI dependency: the caller if they hold ``capability``, else 401/403 — before
    the request's body or ids are looked at."""
    async def dependency(request: Request) -> Principal:
        principal = await authenticate(request)
        require(principal, capability)
        return principal
    return dependency


async def node_agent(request: Request) -> Principal:
    """FastAPI dependency of the ``/internal/v1/nodes/{node_id}`` task channel: a node
    token for that very node, else 401/403."""
    principal = _bearer(request)
    node_id = request.path_params.get("node_id")
    if principal.actor_type != "node" or str(principal.user_id) != str(node_id):
        raise ApiError(403, "insufficient_permissions", "a node agent token for this node is required")
    return principal


#: the dependency of every operator (``/admin``, ``/platform``) operation
admin = requires("platform.admin")


def project_scope(request: Request, principal: Principal) -> uuid.UUID:
    """Resolve ``X-Project-ID`` for an operation that takes ``ProjectIdHeader``.

    Missing or not a uuid → 400; then ``project_access``."""
    raw = request.headers.get("x-project-id")
    try:
        project = uuid.UUID(raw or "")
    except ValueError:
        raise ApiError(400, "validation_error", "X-Project-ID must be a uuid",
                       header="X-Project-ID") from None
    return project_access(request, principal, project)


def project_access(request: Request, principal: Principal, project: uuid.UUID) -> uuid.UUID:
    """The scope and role checks of a project-scoped request (header or path): not a
    member, unknown project, or a service-account token for another project → 403 with
    the same body, so nothing is revealed; then a project ``viewer`` sending anything
    but a read (``READ_METHODS``: a precheck is refused too) → 403
    ``insufficient_permissions``."""
    require_member(principal, project)
    if request.method not in READ_METHODS:
        require_project_role(principal, project, *PROJECT_WRITERS)
    return project


def require_project_role(principal: Principal, project: uuid.UUID, *roles: str,
                         capability: str | None = None) -> None:
    """403 ``insufficient_permissions`` unless the caller's role in ``project`` (checked
    a member before) is one of ``roles``, or they hold ``capability``."""
    if principal.project_role(project) in roles or (capability and principal.can(capability)):
        return
    raise ApiError(403, "insufficient_permissions",
                   f"this operation needs project role {' or '.join(roles)}",
                   required_roles=list(roles))


def require_tenant_role(principal: Principal, *roles: str, capability: str | None = None) -> None:
    """403 ``insufficient_permissions`` unless the caller's tenant role is one of
    ``roles``, or they hold ``capability``."""
    if principal.tenant_role in roles or (capability and principal.can(capability)):
        return
    raise ApiError(403, "insufficient_permissions",
                   f"this operation needs tenant role {' or '.join(roles)}",
                   required_roles=list(roles))


async def billing_writer(request: Request) -> Principal:
    """FastAPI dependency of a mutation on the caller's tenant billing account: a
    ``billing_viewer`` reads billing and is refused here (403), before the body."""
    principal = await authenticate(request)
    require_tenant_role(principal, *BILLING_WRITERS)
    return principal


def require_member(principal: Principal, project: uuid.UUID) -> None:
    """403 unless the caller belongs to ``project`` (a service account: its one project)."""
    if principal.actor_type == "service_account":
        if principal.token_project_id != project:
            raise ApiError(403, "token_scope_invalid", "the token is not valid for this project")
    elif project not in principal.project_ids:
        raise ApiError(403, "insufficient_permissions", "no access to this project")
