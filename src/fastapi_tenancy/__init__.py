"""fastapi-tenancy: multi-tenancy for FastAPI.

One application, many customers (tenants): every request runs as exactly one
tenant and reaches only that tenant's data. Start with the Quick Start in the
docs; the entry points are re-exported here.
"""

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
    TenantMismatchError,
    TenantNotFoundError,
    TenantResolutionError,
)
from .manager import TenancyManager
from .middleware import TenancyMiddleware
from .tenant import Tenant, TenantStatus

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "InvalidIdentifierError",
    "InvalidTokenError",
    "InvalidTransitionError",
    "MissingDependencyError",
    "ProvisioningError",
    "RateLimitExceededError",
    "TenancyConfig",
    "TenancyError",
    "TenancyManager",
    "TenancyMiddleware",
    "TenancyUnavailableError",
    "Tenant",
    "TenantAlreadyExistsError",
    "TenantChangedError",
    "TenantInactiveError",
    "TenantMismatchError",
    "TenantNotFoundError",
    "TenantResolutionError",
    "TenantStatus",
    "__version__",
    "current_tenant",
    "current_tenant_or_none",
    "tenant_scope",
]
