"""Fixtures of the Citus tests beside `citus_url` (tests/conftest.py)."""

from tests.isolation.conftest import citus_tenant_roles  # noqa: F401 - a fixture: roles on the coordinator
