"""The tenant in the OpenAPI schema: how `/docs` shows a client to name it on every tenant route.

`TenancyMiddleware` passes the app's `/openapi.json` through `tenant_openapi`, so
Swagger UI's "Try it out" and its Authorize dialog send what the resolver reads: the
tenant header, the tenant's path segment, or a bearer token. `app.openapi()` keeps
returning the app's own schema. Each resolver says what it reads
(`Resolver.openapi`); a custom resolver that says nothing adds nothing.
"""

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from ._utils import path_covers, path_prefixes
from .resolution.base import OpenAPITenant, Resolver

__all__ = ["tenant_openapi"]

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_TENANT = "The tenant's identifier, e.g. `acme`."


def tenant_openapi(
    schema: Mapping[str, Any], resolver: Resolver, *, excluded_paths: Iterable[str] = ()
) -> dict[str, Any]:
    """A copy of the OpenAPI `schema` where every tenant operation shows how to name the tenant.

        schema = tenant_openapi(app.openapi(), manager.resolver, excluded_paths=["/health"])

    What `/openapi.json` serves through `TenancyMiddleware`; call it to export the
    schema without serving it. Operations under `excluded_paths` (matched like the
    middleware's) are left as they are, and so is what the app declares itself: a
    header parameter of the same name, or a bearer or OAuth2 scheme of its own on
    the operation (that token is the one the JWT strategy reads).
    """
    documented = copy.deepcopy(dict(schema))
    hints = resolver.openapi()
    if hints is None:
        return documented
    excluded = path_prefixes(excluded_paths)
    bearers = _bearer_schemes(documented)
    if hints.security_schemes:
        schemes = documented.setdefault("components", {}).setdefault("securitySchemes", {})
        for name, scheme in hints.security_schemes.items():
            schemes.setdefault(name, dict(scheme))
    servers = _servers(documented, hints)
    paths: dict[str, Any] = {}
    for path, item in (documented.get("paths") or {}).items():
        if any(path_covers(prefix, path) for prefix in excluded) or not isinstance(item, dict):
            paths[path] = item
            continue
        parameters = [dict(parameter) for parameter in hints.parameters]
        if hints.path_prefix is not None:
            name = _free_name(path, item)
            path = f"{hints.path_prefix}/{{{name}}}{path}"
            parameters.insert(0, {"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
            parameters[0]["description"] = _TENANT
        for method in _METHODS:
            operation = item.get(method)
            if isinstance(operation, dict):
                _add_parameters(operation, item, parameters)
                _add_security(operation, hints, bearers)
        if servers:
            item["servers"] = copy.deepcopy(servers)
        paths[path] = item
    if "paths" in documented:
        documented["paths"] = paths
    return documented


def _add_parameters(
    operation: dict[str, Any], item: dict[str, Any], parameters: list[dict[str, Any]]
) -> None:
    declared = [*item.get("parameters", ()), *operation.get("parameters", ())]
    present = {_parameter_key(parameter) for parameter in declared if isinstance(parameter, dict)}
    # First in the list, so Swagger UI shows the tenant above the route's own parameters.
    added = [copy.deepcopy(p) for p in parameters if _parameter_key(p) not in present]
    if added:
        operation["parameters"] = [*added, *operation.get("parameters", ())]


def _parameter_key(parameter: Mapping[str, Any]) -> tuple[Any, Any]:
    name = parameter.get("name")
    # Header names match without regard to case (`x_tenant_id: Header()` is `x-tenant-id`).
    if parameter.get("in") == "header" and isinstance(name, str):
        name = name.lower()
    return parameter.get("in"), name


def _add_security(operation: dict[str, Any], hints: OpenAPITenant, bearers: set[str]) -> None:
    if not hints.security_schemes:
        return
    existing = [requirement for requirement in operation.get("security", ()) if isinstance(requirement, dict)]
    if any(name in bearers for requirement in existing for name in requirement):
        return  # the app's own bearer or OAuth2 scheme sends the token the resolver reads
    ours: dict[str, list[str]] = {name: [] for name in hints.security_schemes}
    if not existing:
        # `{}` is OpenAPI's "no security": the token is one way to name the tenant among others.
        operation["security"] = [ours, {}] if hints.security_optional else [ours]
        return
    with_ours = [{**requirement, **ours} for requirement in existing]
    operation["security"] = [*existing, *with_ours] if hints.security_optional else with_ours


def _bearer_schemes(schema: Mapping[str, Any]) -> set[str]:
    """The app's own schemes that send `Authorization: Bearer`."""
    schemes = (schema.get("components") or {}).get("securitySchemes") or {}
    found = set()
    for name, scheme in schemes.items():
        kind = scheme.get("type") if isinstance(scheme, dict) else None
        if kind in ("oauth2", "openIdConnect") or (
            kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer"
        ):
            found.add(name)
    return found


def _servers(schema: Mapping[str, Any], hints: OpenAPITenant) -> list[dict[str, Any]]:
    """Servers for tenant operations: the schema's own first (this host), then the hinted hosts.

    A hinted server is a host; the schema's base path (its first server, when that is a
    path such as an app's `root_path`) is appended to it.
    """
    if not hints.servers:
        return []
    own = [dict(server) for server in schema.get("servers") or () if isinstance(server, dict)]
    own = own or [{"url": "/", "description": "this host"}]
    base = str(own[0].get("url", ""))
    base = base.rstrip("/") if base.startswith("/") else ""
    return [*own, *({**server, "url": str(server["url"]) + base} for server in hints.servers)]


def _free_name(path: str, item: Mapping[str, Any]) -> str:
    """`tenant`, or a name the route does not use for a path parameter of its own."""
    taken: set[Any] = set()
    for method in _METHODS:
        operation = item.get(method)
        if isinstance(operation, dict):
            taken.update(p.get("name") for p in operation.get("parameters", ()) if isinstance(p, dict))
    name = "tenant"
    while name in taken or "{" + name + "}" in path:
        name += "_"
    return name
