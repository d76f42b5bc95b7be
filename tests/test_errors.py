"""The exceptions: each survives pickling as itself (ARQ pickles a failed job's exception to
send it to whoever awaits the job), with its message, public detail and headers."""

import pickle
from types import MappingProxyType

import pytest

from fastapi_tenancy import errors

INSTANCES: list[errors.TenancyError] = [
    errors.TenancyError("plain"),
    errors.ConfigurationError("bad setting"),
    errors.MissingDependencyError("redis", "redis"),
    errors.InvalidIdentifierError("bad slug"),
    errors.InvalidDomainError("bad domain"),
    errors.InvalidTransitionError("deleted -> active"),
    errors.TenantAlreadyExistsError("taken"),
    errors.DomainTakenError("acme.com belongs to another tenant"),
    errors.TenantChangedError("raced"),
    errors.ProvisioningError("no storage"),
    errors.FleetBusyError("locked"),
    errors.TenantScopeError("COMMIT"),
    errors.TenantResolutionError(),
    errors.InvalidTokenError("expired", detail="Token expired"),
    errors.TenantMismatchError(),
    errors.TenantNotFoundError("no tenant 'acme'"),
    errors.DomainNotFoundError("no domain 'acme.com'"),
    errors.TenantInactiveError("suspended"),
    errors.TenantMaintenanceError("Back at 14:00", 600),
    errors.RateLimitExceededError("acme", {"retry-after": "3"}),
    errors.TenantBusyError("acme"),
    errors.TenancyUnavailableError("registry down"),
    errors.IsolationError("leak", report=None),
]


def test_every_error_class_is_exercised() -> None:
    classes = {getattr(errors, name) for name in errors.__all__}
    assert classes == {type(error) for error in INSTANCES}


@pytest.mark.parametrize("error", INSTANCES, ids=lambda e: type(e).__name__)
def test_an_error_survives_pickling_unchanged(error: errors.TenancyError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (str(copy), copy.args, copy.detail, copy.status_code) == (
        str(error),
        error.args,
        error.detail,
        error.status_code,
    )
    assert dict(copy.headers) == dict(error.headers)
    assert isinstance(copy.headers, MappingProxyType)  # still read-only
    assert vars(copy).keys() == vars(error).keys()


def test_an_inactive_tenant_unpickles_with_its_message_once() -> None:
    copy = pickle.loads(pickle.dumps(errors.TenantInactiveError("suspended")))
    assert str(copy) == copy.detail == "Tenant is not active (status: suspended)"
    assert copy.status == "suspended"


# The errors a job is refused with (integrations/), as a job result backend stores them.
REFUSALS = [
    e
    for e in INSTANCES
    if type(e)
    in (
        errors.TenantResolutionError,
        errors.TenantNotFoundError,
        errors.TenantInactiveError,
        errors.TenantMaintenanceError,
        errors.TenancyUnavailableError,
        errors.ConfigurationError,
    )
]


@pytest.mark.parametrize("error", REFUSALS, ids=lambda e: type(e).__name__)
def test_a_job_refusal_rebuilt_from_its_args_is_the_same(error: errors.TenancyError) -> None:
    # What serializers that do not pickle do (Celery's JSON results: `cls(*exc.args)`).
    copy = type(error)(*error.args)
    assert (str(copy), copy.args, copy.detail, copy.status_code) == (
        str(error),
        error.args,
        error.detail,
        error.status_code,
    )
    assert dict(copy.headers) == dict(error.headers)
    assert vars(copy) == vars(error)


def test_maintenance_is_an_inactive_tenant_and_a_retryable_503() -> None:
    error = errors.TenantMaintenanceError("Back at 14:00", 600)
    assert isinstance(error, errors.TenantInactiveError) and isinstance(error, errors.TenancyUnavailableError)
    assert (error.status_code, error.status, error.retry_after) == (503, "maintenance", 600)
    assert dict(error.headers) == {"retry-after": "600"}
    assert str(error) == error.detail == "Back at 14:00"
