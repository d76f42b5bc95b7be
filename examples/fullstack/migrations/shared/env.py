"""Shared migrations: tables every tenant sees (in `public`), versioned apart from the tenants."""

from logging.config import fileConfig

from alembic import context
from fastapi_tenancy.migrations import run_shared_migrations

# The MetaData of your shared tables (those declared with schema="public").
target_metadata = None

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)

run_shared_migrations(context, target_metadata)
