"""The CLI tests share the migration tests' PostgreSQL manager fixture."""

from tests.migrations.conftest import manager  # noqa: F401 - a fixture, used by name
