"""fastapi-tenancy: multi-tenancy for FastAPI.

One application, many customers (tenants): every request runs as exactly one
tenant and reaches only that tenant's data. Start with the Quick Start in the
docs; the entry points are re-exported here.
"""

import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .compat import legacy_import_error as _legacy_import_error
from .config import TenancyConfig
from .context import current_tenant, current_tenant_or_none, tenant_scope
from .errors import (
    ConfigurationError,
    InvalidIdentifierError,
    InvalidTokenError,
    InvalidTransitionError,
    MissingDependencyError,
    ProvisioningError,
    RateLimitExceededError,
    TenancyError,
    TenancyUnavailableError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantInactiveError,
    TenantMaintenanceError,
    TenantMismatchError,
    TenantNotFoundError,
    TenantResolutionError,
)
from .manager import TenancyManager
from .middleware import TenancyMiddleware
from .storage.base import TenantStore
from .storage.database import SQLAlchemyTenantStore
from .storage.memory import InMemoryTenantStore
from .tenant import Tenant, TenantStatus

__version__ = "0.1.0"

# fastapi-tenancy 0.5.0 imported the middleware from `fastapi_tenancy.middleware.tenancy`:
# that path names the middleware module too, so such code runs unchanged.
_sys.modules[f"{__name__}.middleware.tenancy"] = _sys.modules[f"{__name__}.middleware"]

if not _TYPE_CHECKING:  # hidden from type checkers, which would otherwise accept any name here

    def __getattr__(name: str) -> object:
        # A 0.5.0 name we do not export says what replaced it (compat.py), at import time.
        error = _legacy_import_error(__name__, name)
        if error is not None:
            raise error
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConfigurationError",
    "InMemoryTenantStore",
    "InvalidIdentifierError",
    "InvalidTokenError",
    "InvalidTransitionError",
    "MissingDependencyError",
    "ProvisioningError",
    "RateLimitExceededError",
    "SQLAlchemyTenantStore",
    "TenancyConfig",
    "TenancyError",
    "TenancyManager",
    "TenancyMiddleware",
    "TenancyUnavailableError",
    "Tenant",
    "TenantAlreadyExistsError",
    "TenantChangedError",
    "TenantInactiveError",
    "TenantMaintenanceError",
    "TenantMismatchError",
    "TenantNotFoundError",
    "TenantResolutionError",
    "TenantStatus",
    "TenantStore",
    "__version__",
    "current_tenant",
    "current_tenant_or_none",
    "tenant_scope",
]
