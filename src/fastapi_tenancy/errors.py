"""Exceptions raised by fastapi-tenancy.

Every exception derives from `TenancyError`. Those that reach a client carry an
HTTP `status_code` and a public `detail`; the exception message itself is for
logs and may say more (it never holds secrets either).

    TenancyError
    ├── ConfigurationError (ValueError)           a config or wiring mistake
    ├── MissingDependencyError (ImportError)      an optional extra is not installed
    ├── InvalidIdentifierError (ValueError)       a slug that can never name a tenant
    ├── InvalidDomainError (ValueError)           a host name no tenant can have
    ├── InvalidTransitionError (ValueError)       a lifecycle change the state machine forbids
    ├── TenantAlreadyExistsError (ValueError)     the slug is taken (also by a deleted tenant)
    │   └── DomainTakenError                      the domain belongs to another tenant
    ├── TenantChangedError                        a concurrent change won; re-read and retry
    ├── ProvisioningError                         storage for a new tenant could not be made
    ├── FleetBusyError                            another fleet migration holds the database
    ├── IsolationError (AssertionError)           assert_isolated found one tenant reaching another
    ├── TenantScopeError                          route SQL tried to end the tenant's transaction
    ├── TenantResolutionError                     400: the request names no tenant
    ├── InvalidTokenError                         401: the bearer token is not acceptable
    ├── TenantMismatchError                       403: two sources name different tenants
    ├── TenantNotFoundError (LookupError)         404: no such tenant
    │   └── DomainNotFoundError                   the tenant has no such domain
    ├── TenantInactiveError                       403: the tenant is suspended, deleted, ...
    │   └── TenantMaintenanceError (also a TenancyUnavailableError)
    │                                             503: the tenant is in maintenance; Retry-After
    ├── RateLimitExceededError                    429: the tenant used up its request quota
    │   └── TenantBusyError                       429: too many of its requests in flight at once
    └── TenancyUnavailableError                   503: the registry cannot be reached

Errors rebuilt from their arguments by serializers that do not pickle (Celery's JSON
results rebuild `cls(*exc.args)`) come back the same: each class's `args` are the
arguments of its constructor.
"""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

__all__ = [
    "ConfigurationError",
    "DomainNotFoundError",
    "DomainTakenError",
    "FleetBusyError",
    "InvalidDomainError",
    "InvalidIdentifierError",
    "InvalidTokenError",
    "InvalidTransitionError",
    "IsolationError",
    "MissingDependencyError",
    "ProvisioningError",
    "RateLimitExceededError",
    "TenancyError",
    "TenancyUnavailableError",
    "TenantAlreadyExistsError",
    "TenantBusyError",
    "TenantChangedError",
    "TenantInactiveError",
    "TenantMaintenanceError",
    "TenantMismatchError",
    "TenantNotFoundError",
    "TenantResolutionError",
    "TenantScopeError",
]


class TenancyError(Exception):
    """Base class of every fastapi-tenancy error.

    `detail` is what a client may see; the message (`str(exc)`) is for logs.
    `headers` are sent with the refusal (e.g. `WWW-Authenticate` with a 401).
    """

    status_code: ClassVar[int] = 500
    detail: str = "Internal tenancy error"
    headers: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self, message: str = "", *, detail: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message or self.detail)
        if detail is not None:
            self.detail = detail
        if headers is not None:
            self.headers = headers

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by state, not by calling __init__ again with the message (pickle's
        # default): subclasses take other arguments, and TenantInactiveError would wrap
        # its own message a second time. ARQ pickles a failed job's exception this way.
        state = {k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in vars(self).items()}
        return (_restore, (type(self), self.args, state))


def _restore(cls: type[TenancyError], args: tuple[Any, ...], state: dict[str, Any]) -> TenancyError:
    """An unpickled `TenancyError`: its class, message and attributes, without `__init__`."""
    error = cls.__new__(cls)
    error.args = args
    for name, value in state.items():
        setattr(
            error, name, MappingProxyType(value) if isinstance(value, dict) and name == "headers" else value
        )
    return error


class ConfigurationError(TenancyError, ValueError):
    """The configuration or the way the parts are wired together is invalid."""


class MissingDependencyError(TenancyError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'fastapi-tenancy[{extra}]'")


class InvalidIdentifierError(TenancyError, ValueError):
    """A tenant identifier (slug) that no tenant can have."""

    status_code = 404
    detail = "Tenant not found"


class InvalidDomainError(TenancyError, ValueError):
    """A host name that no tenant can have: malformed, an IP address, punycode, central, or
    under another tenant's subdomain."""

    status_code = 422
    detail = "Invalid domain"


class InvalidTransitionError(TenancyError, ValueError):
    """A tenant status change that the lifecycle does not allow."""

    status_code = 409
    detail = "Tenant status change not allowed"


class TenantAlreadyExistsError(TenancyError, ValueError):
    """The identifier is already held by a tenant (deleted tenants keep theirs)."""

    status_code = 409
    detail = "Tenant already exists"


class DomainTakenError(TenantAlreadyExistsError):
    """The domain already belongs to another tenant: a domain names one tenant at most."""

    detail = "Domain already taken"


class TenantChangedError(TenancyError):
    """The tenant changed since it was read (compare-and-set failed): re-read, re-apply."""

    status_code = 409
    detail = "Tenant changed concurrently"


class ProvisioningError(TenancyError):
    """The tenant's storage could not be created; nothing of the tenant was kept."""


class TenantResolutionError(TenancyError):
    """The request does not name a tenant."""

    status_code = 400
    detail = "Tenant identifier missing"


class InvalidTokenError(TenancyError):
    """The bearer token is malformed, badly signed, expired or fails a claim check.

    Answered 401 with `WWW-Authenticate: Bearer error="invalid_token"`; the detail
    never contains the token.
    """

    status_code = 401
    detail = "Invalid token"
    headers: Mapping[str, str] = MappingProxyType({"www-authenticate": 'Bearer error="invalid_token"'})


class TenantMismatchError(TenancyError):
    """Two sources that must agree (e.g. a token's claim and the subdomain) name different tenants."""

    status_code = 403
    detail = "Tenant mismatch"


class TenantNotFoundError(TenancyError, LookupError):
    """No tenant has this identifier or id."""

    status_code = 404
    detail = "Tenant not found"


class DomainNotFoundError(TenantNotFoundError):
    """The tenant has no such domain."""

    detail = "Domain not found"


class TenantInactiveError(TenancyError):
    """The tenant exists but may not be served (its status is not `active`)."""

    status_code = 403

    def __init__(self, status: str) -> None:
        self.status = status
        detail = f"Tenant is not active (status: {status})"
        super().__init__(detail, detail=detail)
        # The constructor's argument, so that `TenantInactiveError(*exc.args)` is the same
        # error (Celery rebuilds JSON-stored exceptions so); `str()` stays the message.
        self.args = (status,)

    def __str__(self) -> str:
        return self.detail


class RateLimitExceededError(TenancyError):
    """The tenant made more requests than its limit allows; `headers` say when to retry."""

    status_code = 429

    def __init__(self, identifier: str, headers: Mapping[str, str]) -> None:
        super().__init__(
            detail=f"Rate limit exceeded for tenant {identifier}", headers=MappingProxyType(dict(headers))
        )


class TenantBusyError(RateLimitExceededError):
    """The tenant already has as many requests in flight as `tenant_max_concurrent_requests`
    allows, and no slot freed up within `tenant_concurrency_wait`; retry in a second."""

    def __init__(self, identifier: str) -> None:
        detail = f"Too many concurrent requests for tenant {identifier}"
        TenancyError.__init__(self, detail, detail=detail, headers=MappingProxyType({"retry-after": "1"}))
        self.args = (identifier,)


class TenancyUnavailableError(TenancyError):
    """The tenant registry or the tenant's database cannot be reached right now."""

    status_code = 503
    detail = "Tenancy backend unavailable"


class TenantMaintenanceError(TenantInactiveError, TenancyUnavailableError):
    """The tenant is in maintenance: answered 503 with `Retry-After`, and worth retrying later.

    A `TenantInactiveError` (it is not served) and a `TenancyUnavailableError` (come back
    later): code catching either keeps working. `detail` is the configured
    `maintenance_message`; `retry_after` the seconds sent in `Retry-After`.
    """

    status_code = 503

    def __init__(self, detail: str = "Tenant is under maintenance", retry_after: int = 120) -> None:
        self.status = "maintenance"
        self.retry_after = retry_after
        TenancyError.__init__(
            self, detail, detail=detail, headers=MappingProxyType({"retry-after": str(retry_after)})
        )
        self.args = (detail, retry_after)


class FleetBusyError(TenancyError):
    """Another fleet migration is running against this database."""


class TenantScopeError(TenancyError):
    """A statement in a tenant session would have run outside the tenant's transaction.

    Raised before it runs, for transaction control in route SQL (`COMMIT`, `ROLLBACK`,
    `END`, `ABORT`, `PREPARE TRANSACTION`, `... AND CHAIN`): ending the transaction the
    tenant's setting lives in would leave the next statements unscoped. Use the
    session's `commit()` and `rollback()`, which begin the next transaction scoped again.
    Raised too when something below SQLAlchemy ended the transaction anyway (raw
    driver calls): no statement runs until the session is rolled back. With tenant roles
    (`schema_tenant_roles`), also raised for statements that change the role (`SET ROLE`,
    `RESET ROLE`, `RESET ALL`, `set_config('role', ...)`, ...): the transaction runs as
    its tenant's role.
    """

    detail = "A statement tried to leave the tenant's transaction"


class IsolationError(TenancyError, AssertionError):
    """`assert_isolated` found tenant B's data read or changed by tenant A (or could not check).

    An `AssertionError` too, so that test runners report it as a failed assertion.
    `report` is the `fastapi_tenancy.probe.IsolationReport` of the run.
    """

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report
