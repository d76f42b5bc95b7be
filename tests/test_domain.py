"""The rules for domain names (domain.py): what a tenant may have, and which hosts are whose."""

import pytest

from fastapi_tenancy import ConfigurationError
from fastapi_tenancy.domain import Domain, DomainPolicy, is_domain, validate_domain
from fastapi_tenancy.errors import InvalidDomainError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("acme.com", True),
        ("a.b", True),
        ("app.eu.acme.co.uk", True),
        ("123.acme", True),
        ("a1.b2", True),
        ("axn--b.com", True),  # "xn--" only matters at the start of a label
        ("a" * 63 + ".com", True),
        ("a" * 64 + ".com", False),  # a label of 64
        (".".join(["a" * 61] * 4) + ".com", True),  # 251 characters
        (".".join(["a" * 62] * 4) + ".com", False),  # 255: longer than a DNS name
        ("acme", False),  # one label
        ("1.2.3.4", False),
        ("acme.123", False),
        ("xn--bcher-kva.de", False),
        ("acme.xn--p1ai", False),
        ("-acme.com", False),
        ("acme-.com", False),
        ("a..com", False),
        (".acme.com", False),
        ("acme.com.", False),  # not normalised
        ("ACME.com", False),
        ("acme_corp.com", False),
        ("acme.com\n", False),
        ("acme.123\n", False),
        ("ac me.com", False),
        ("аcme.com", False),
        ("", False),
    ],
    ids=repr,
)
def test_what_a_tenant_may_have(name: str, expected: bool) -> None:
    assert is_domain(name) is expected


@pytest.mark.parametrize(
    ("name", "normalised"),
    [("ACME.com.", "acme.com"), ("App.Acme.COM", "app.acme.com"), ("acme.com", "acme.com")],
)
def test_names_are_normalised(name: str, normalised: str) -> None:
    assert validate_domain(name) == normalised


@pytest.mark.parametrize(
    "name",
    ["\u212aacme.com", " acme.com", "acme.com..", "acme.com/", "*.acme.com", "10.0.0.1", "xn--cme-5cd.com"],
)
def test_names_no_tenant_can_have_are_refused(name: str) -> None:
    with pytest.raises(InvalidDomainError):  # a ValueError
        validate_domain(name)


def test_a_domain_record_holds_a_normalised_name_and_a_tenant() -> None:
    assert Domain("acme.com", "id-1") == Domain("acme.com", "id-1", primary=False)
    with pytest.raises(InvalidDomainError):
        Domain("ACME.com", "id-1")
    with pytest.raises(ValueError):
        Domain("acme.com", "")


POLICY = DomainPolicy(
    domain_suffix="Example.COM", central=["admin.example.com", "example.org"], reserved=["www"]
)


@pytest.mark.parametrize(
    ("host", "kind", "name"),
    [
        ("acme.example.com", "subdomain", "acme"),
        ("acme_corp.example.com", "subdomain", "acme_corp"),  # looked up as an identifier: 404
        ("shop.acme.example.com", "registered", "shop.acme.example.com"),
        ("acme.com", "registered", "acme.com"),
        ("example.com", "central", "example.com"),
        ("www.example.com", "central", "www.example.com"),
        ("x.www.example.com", "central", "x.www.example.com"),
        ("admin.example.com", "central", "admin.example.com"),
        ("example.org", "central", "example.org"),
        ("xn--80ak6aa92e.example.com", "none", "xn--80ak6aa92e.example.com"),
        ("localhost", "none", "localhost"),
        ("10.0.0.1", "none", "10.0.0.1"),
    ],
)
def test_which_hosts_are_whose(host: str, kind: str, name: str) -> None:
    assert POLICY.classify(host) == (kind, name)


def test_without_a_suffix_every_domain_is_looked_up() -> None:
    policy = DomainPolicy()
    assert policy.classify("acme.example.com") == ("registered", "acme.example.com")
    assert policy.classify("localhost") == ("none", "localhost")


def test_urls_use_the_primary_domain_else_the_subdomain() -> None:
    domains = [Domain("www.acme.com", "id"), Domain("acme.com", "id", primary=True)]
    assert POLICY.url("acme", domains, "/a?b=1") == "https://acme.com/a?b=1"
    assert POLICY.url("acme", [], "a", scheme="http") == "http://acme.example.com/a"
    with pytest.raises(ConfigurationError):
        DomainPolicy().url("acme", [Domain("acme.com", "id")])
    with pytest.raises(ValueError):
        POLICY.url("acme", domains, scheme="ftp")
