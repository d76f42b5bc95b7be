"""`TenantSpanMiddleware`: the tenant as attributes of the request's OpenTelemetry span.

Needs `pip install 'fastapi-tenancy[otel]'` (opentelemetry-api only; the SDK and
the ASGI instrumentation are the application's choice).
"""

from starlette.types import ASGIApp, Receive, Scope, Send

from .context import current_tenant_or_none
from .errors import MissingDependencyError

try:
    from opentelemetry import trace
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("opentelemetry-api", "otel") from exc

__all__ = ["TENANT_IDENTIFIER_ATTRIBUTE", "TENANT_ID_ATTRIBUTE", "TenantSpanMiddleware"]

TENANT_IDENTIFIER_ATTRIBUTE = "tenant.identifier"
TENANT_ID_ATTRIBUTE = "tenant.id"


class TenantSpanMiddleware:
    """Pure ASGI middleware: put the resolved tenant on the current span. Shared by all requests.

    Add it before `TenancyMiddleware` (Starlette wraps the last added outermost),
    so it runs inside it, where the tenant is known, and inside your tracing
    middleware, whose span it annotates:

        app.add_middleware(TenantSpanMiddleware)
        app.add_middleware(TenancyMiddleware, manager=manager)
        app.add_middleware(OpenTelemetryMiddleware)

    Costs one ContextVar read and, when a span is recording, two attribute sets.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tenant = current_tenant_or_none() if scope["type"] in ("http", "websocket") else None
        if tenant is not None:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute(TENANT_IDENTIFIER_ATTRIBUTE, tenant.identifier)
                span.set_attribute(TENANT_ID_ATTRIBUTE, tenant.id)
        await self.app(scope, receive, send)
