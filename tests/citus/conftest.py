"""Fixtures of the Citus tests: the row-level security roles and the tenant roles, made on the cluster."""

from ..isolation.conftest import citus_roles, citus_tenant_roles

__all__ = ["citus_roles", "citus_tenant_roles"]
