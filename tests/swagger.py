"""What Swagger UI's "Try it out" sends for an operation of an OpenAPI schema: built from the
schema alone (its parameters, security requirements and servers), as the user fills in the
form and the Authorize dialog, so a test shows that the schema is enough to reach a tenant."""

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

__all__ = ["MissingInput", "try_it_out"]

_VARIABLE = re.compile(r"\{([^{}]+)\}")


class MissingInput(LookupError):
    """The form has a required field the user left empty: Swagger UI does not send the request."""


def try_it_out(
    schema: Mapping[str, Any],
    path: str,
    method: str,
    typed: Mapping[str, str],
    *,
    authorized: Mapping[str, str] | None = None,
    server: int = 0,
    origin: str = "http://app.test",
) -> httpx.Request:
    """The request for `method path`, with `typed` values for the fields the form shows (by
    parameter or server variable name) and `authorized` credentials by security scheme name.
    `origin` is where the docs page was opened: relative server URLs resolve against it."""
    item = schema["paths"][path]
    operation = item[method]
    target, headers, params = path, {}, {}
    for parameter in [*item.get("parameters", ()), *operation.get("parameters", ())]:
        name, where = parameter["name"], parameter["in"]
        if name not in typed:
            if parameter.get("required", False):
                raise MissingInput(f"{where} parameter {name!r} is required")
            continue
        if where == "path":
            target = target.replace("{" + name + "}", quote(typed[name], safe=""))
        elif where == "header":
            headers[name] = typed[name]
        elif where == "query":
            params[name] = typed[name]
    schemes = schema.get("components", {}).get("securitySchemes", {})
    for requirement in operation.get("security", schema.get("security", ())):
        # The first alternative the Authorize dialog satisfies; `{}` needs nothing.
        if all(name in (authorized or {}) for name in requirement):
            for name in requirement:
                scheme = schemes[name]
                assert (scheme["type"], scheme.get("scheme", "").lower()) == ("http", "bearer"), scheme
                headers["Authorization"] = f"Bearer {(authorized or {})[name]}"
            break
    else:
        if operation.get("security"):
            raise MissingInput("not authorized for any security requirement")
    servers = item.get("servers") or schema.get("servers") or [{"url": "/"}]
    chosen = servers[server]
    variables = chosen.get("variables", {})
    base = _VARIABLE.sub(lambda m: typed.get(m.group(1), variables[m.group(1)]["default"]), chosen["url"])
    url = base.rstrip("/") + target if "://" in base else origin + base.rstrip("/") + target
    return httpx.Request(method.upper(), url, headers=headers, params=params)
