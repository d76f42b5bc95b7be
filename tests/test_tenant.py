"""Tenant: immutable (metadata too), the status lifecycle, identifier and storage-name rules."""

import dataclasses
import itertools

import pytest

from fastapi_tenancy import InvalidIdentifierError, InvalidTransitionError, Tenant, TenantStatus
from fastapi_tenancy.isolation import storage_name
from fastapi_tenancy.tenant import FrozenDict, thaw, validate_identifier


def test_tenant_and_its_metadata_are_immutable() -> None:
    tenant = Tenant(identifier="acme", name="Acme", metadata={"limits": {"rpm": 10}, "tags": ["a"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        tenant.name = "Other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        tenant.metadata["plan"] = "pro"  # type: ignore[index]
    with pytest.raises(TypeError):
        tenant.metadata["limits"]["rpm"] = 1_000_000
    assert tenant.metadata["tags"] == ("a",)
    assert hash(tenant) == hash(dataclasses.replace(tenant))


def test_changes_return_new_tenants() -> None:
    tenant = Tenant(identifier="acme", name="Acme", metadata={"plan": "free"})
    changed = tenant.with_changes(metadata={"plan": "pro"})
    assert (tenant.metadata["plan"], changed.metadata["plan"]) == ("free", "pro")
    assert changed.updated_at >= tenant.updated_at


def test_metadata_equals_the_plain_value_it_was_made_from() -> None:
    plain = {"tags": ["a", "b"], "limits": {"rpm": 10, "paths": [["/x", 1]]}, "plan": None}
    tenant = Tenant(identifier="acme", name="Acme", metadata=plain)
    assert tenant.metadata == plain
    assert plain == tenant.metadata
    assert tenant.metadata == thaw(tenant.metadata)  # what a store writes and reads back
    assert tenant.metadata == Tenant(identifier="acme", name="Acme", metadata=plain).metadata
    assert tenant.metadata != {**plain, "tags": ["b", "a"]}
    assert tenant.metadata != {**plain, "plan": "pro"}
    assert tenant.metadata != {"tags": ["a", "b"]}
    assert tenant.with_changes(metadata={"tags": ["c"]}).metadata == {"tags": ["c"]}
    assert hash(tenant.metadata) == hash(FrozenDict(plain))


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_empty_id_and_name_are_refused(blank: str) -> None:
    with pytest.raises(ValueError, match="tenant id"):
        Tenant(identifier="acme", name="Acme", id=blank)
    with pytest.raises(ValueError, match="tenant name"):
        Tenant(identifier="acme", name=blank)
    with pytest.raises(ValueError, match="tenant name"):
        Tenant(identifier="acme", name="Acme").with_changes(name=blank)


ALLOWED = {
    ("provisioning", "active"),
    ("provisioning", "deleted"),
    ("active", "suspended"),
    ("active", "deleted"),
    ("active", "maintenance"),
    ("maintenance", "active"),
    ("maintenance", "suspended"),
    ("maintenance", "deleted"),
    ("suspended", "active"),
    ("suspended", "deleted"),
}


@pytest.mark.parametrize(("start", "end"), list(itertools.product(TenantStatus, TenantStatus)))
def test_status_transitions_are_enforced(start: TenantStatus, end: TenantStatus) -> None:
    tenant = Tenant(identifier="acme", name="Acme", status=start)
    if (start.value, end.value) in ALLOWED:
        assert tenant.with_status(end).status is end
    else:
        with pytest.raises(InvalidTransitionError):
            tenant.with_status(end)


@pytest.mark.parametrize("good", ["a", "acme", "acme-corp", "acme--corp", "9lives", "a" * 63])
def test_valid_identifiers(good: str) -> None:
    assert validate_identifier(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "-a",
        "a-",
        "A",
        "Acme",
        "acme_corp",
        "acme.corp",
        "a" * 64,
        "ácme",
        "acme\x00",
        " acme",
        "acme\n",
        "$$",
        "a;b",
        "a'b",
        'a"b',
        "ａｃｍｅ",
        "xn--acme",
        None,
        42,
    ],
)
def test_invalid_identifiers(bad: object) -> None:
    if bad == "xn--acme":  # punycode-looking slugs are fine as slugs: no decoding happens anywhere
        assert validate_identifier(bad) == bad
        return
    with pytest.raises(InvalidIdentifierError):
        validate_identifier(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifierError):
        Tenant(identifier=bad, name="x")  # type: ignore[arg-type]


def test_storage_names_are_injective_and_bounded() -> None:
    slugs = ["acme-corp", "acme--corp", "acme-co-rp", "acmecorp", "a-b-c", "a--b-c", "a-b--c"]
    names = [storage_name("tenant_", s) for s in slugs]
    assert len(set(names)) == len(slugs)
    assert storage_name("tenant_", "acme-corp") == "tenant_acme_corp"
    with pytest.raises(InvalidIdentifierError, match="too long"):
        storage_name("tenant_", "a" * 57)
    with pytest.raises(InvalidIdentifierError, match="reserved"):
        storage_name("information_schem", "a")
    with pytest.raises(InvalidIdentifierError, match="reserved"):
        storage_name("publi", "c")
