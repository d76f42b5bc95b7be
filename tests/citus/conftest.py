"""Fixtures of the Citus tests: the row-level security roles, made on the cluster."""

from ..isolation.conftest import citus_roles

__all__ = ["citus_roles"]
