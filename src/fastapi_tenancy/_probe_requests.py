"""The probe's requests, made from an app's OpenAPI schema: its operations, values for
their parameters and bodies, identifiers read back from the answers. Private to `probe.py`.

Values are markers (unique strings the probe later looks for in the other tenant's
answers) or identifiers (per tenant from 1, so the two tenants' ids overlap).
"""

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

__all__ = ["Operation", "ProbeRequest", "RequestValues", "build_request", "identifiers_in"]

_PATH_PARAM = re.compile(r"{([^}/]+)}")
_MIN_TRACE = 8  # shorter generated values are too common to tell the probe's data by


@dataclass(frozen=True)
class ProbeRequest:
    """One request the probe sends, as one tenant."""

    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    json_body: Any = None
    form: dict[str, Any] | None = None

    def describe(self) -> str:
        query = f"?{'&'.join(f'{k}={v}' for k, v in self.params.items())}" if self.params else ""
        return f"{self.method.upper()} {self.path}{query}"


@dataclass
class Operation:
    """One route of the schema: its method, path template and OpenAPI operation."""

    method: str
    path: str
    spec: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.method.upper()} {self.path}"

    @property
    def path_params(self) -> list[str]:
        return _PATH_PARAM.findall(self.path)


class RequestValues:
    """Request values from the OpenAPI schemas: markers for data, chosen identifiers for ids."""

    def __init__(self, tenant: str, components: Mapping[str, Any], id_names: set[str]) -> None:
        self.tenant = tenant
        self.components = components
        self.id_names = id_names
        self.markers: set[str] = set()
        self.sent_ids: list[Any] = []
        self.generated: set[str] = set()  # every string made up, to recognise what requests created
        self._next_int = 0

    def is_identifier(self, name: str | None) -> bool:
        return name is not None and (
            name in self.id_names or name == "id" or name.endswith(("_id", "Id", "_key", "_slug"))
        )

    def marker(self) -> str:
        # Unique and unmistakable: found in a response, it can only come from this data.
        value = f"ft{self.tenant}{uuid.uuid4().hex[:10]}"
        self.markers.add(value)
        return value

    def number(self) -> int:
        # Per tenant from 1, so both tenants' ids overlap, as in a real database.
        self._next_int += 1
        return self._next_int

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while "$ref" in schema and seen < 20:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = self.components.get("schemas", {}).get(name, {})
            seen += 1
        return schema

    def value(self, schema: Mapping[str, Any], name: str | None, ids: list[Any] | None) -> Any:
        """A value for `schema`; identifier-like names take the next of `ids` when given."""
        schema = self.resolve(schema)
        for combinator in ("anyOf", "oneOf", "allOf"):
            if combinator in schema:
                options = [self.resolve(s) for s in schema[combinator]]
                typed = [s for s in options if s.get("type") != "null"] or options
                return self.value(typed[0], name, ids)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        kind = schema.get("type")
        if ids is not None and self.is_identifier(name) and kind in (None, "integer", "string"):
            fitting = [v for v in ids if kind is None or isinstance(v, int if kind == "integer" else str)]
            if fitting:
                return fitting[self.number() % len(fitting)]
        if kind == "integer":
            value = max(self.number(), int(schema.get("minimum", 0)))
            if self.is_identifier(name):
                self.sent_ids.append(value)
            return value
        if kind == "number":
            return float(max(1.5, schema.get("minimum", 0)))
        if kind == "boolean":
            return True
        if kind == "array":
            return [self.value(schema.get("items", {}), name, ids)]
        if kind == "object" or "properties" in schema:
            return {key: self.value(sub, key, ids) for key, sub in schema.get("properties", {}).items()}
        return self._string(schema, name)

    def _string(self, schema: Mapping[str, Any], name: str | None) -> str:
        value = self._made_up_string(schema, name)
        if len(value) >= _MIN_TRACE:
            self.generated.add(value)
        return value

    def _made_up_string(self, schema: Mapping[str, Any], name: str | None) -> str:
        fmt = schema.get("format")
        if fmt == "uuid" or (fmt is None and self.is_identifier(name)):
            value = str(uuid.uuid4())
            if self.is_identifier(name):
                self.sent_ids.append(value)
                return value
            self.markers.add(value)
            return value
        if fmt == "date-time":
            return "2024-01-02T03:04:05Z"
        if fmt == "date":
            return "2024-01-02"
        marker = self.marker()
        if fmt == "email":
            return f"{marker}@example.com"
        if fmt in ("uri", "url"):
            return f"https://example.com/{marker}"
        max_length = schema.get("maxLength")
        if isinstance(max_length, int) and max_length < len(marker):
            self.markers.discard(marker)
            marker = marker[:max_length]
            if max_length >= 8:
                self.markers.add(marker)
        return marker


def build_request(
    operation: Operation, values: RequestValues, ids: list[Any] | None, path_ids: dict[str, Any]
) -> ProbeRequest:
    """The request for `operation`: path identifiers from `path_ids`, the rest from `values`."""
    path = operation.path
    for name in operation.path_params:
        path = path.replace("{" + name + "}", quote(str(path_ids[name]), safe=""))
    params: dict[str, Any] = {}
    headers: dict[str, str] = {}
    for parameter in operation.spec["parameters"]:
        where, name = parameter.get("in"), parameter.get("name")
        if where == "path" or not parameter.get("required", False):
            continue
        value = values.value(parameter.get("schema", {}), name, ids)
        if where == "query":
            params[name] = value
        elif where == "header":
            headers[name] = str(value)
    json_body: Any = None
    form: dict[str, Any] | None = None
    content = operation.spec.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        json_body = values.value(content["application/json"].get("schema", {}), None, ids)
    elif "application/x-www-form-urlencoded" in content or "multipart/form-data" in content:
        media = content.get("application/x-www-form-urlencoded") or content["multipart/form-data"]
        built = values.value(media.get("schema", {}), None, ids)
        form = built if isinstance(built, dict) else None
    return ProbeRequest(operation.method, path, params, headers, json_body, form)


def identifiers_in(data: Any, names: Callable[[str], bool], into: list[Any]) -> None:
    """Add to `into` the values of `data` (an answer's JSON) under identifier-like `names`."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, int | str) and not isinstance(value, bool) and names(key):
                if value not in into:
                    into.append(value)
            else:
                identifiers_in(value, names, into)
    elif isinstance(data, list):
        for item in data:
            identifiers_in(item, names, into)
