"""`TenantLogFilter`: the current tenant on every log record."""

import logging

from .context import current_tenant_or_none

__all__ = ["TenantLogFilter"]


class TenantLogFilter(logging.Filter):
    """Add `tenant` (the identifier) and `tenant_id` to each record; never drops one.

    Outside any tenant scope both are `default` ("-"). Attach it to a handler, so
    that records of every logger passing through get the fields:

        handler.addFilter(TenantLogFilter())
        handler.setFormatter(logging.Formatter("%(tenant)s %(levelname)s %(message)s"))

    A record that already has a `tenant` attribute (passed with `extra=`) keeps it.
    """

    def __init__(self, name: str = "", *, default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "tenant"):
            tenant = current_tenant_or_none()
            record.tenant = self.default if tenant is None else tenant.identifier
            record.tenant_id = self.default if tenant is None else tenant.id
        return True
