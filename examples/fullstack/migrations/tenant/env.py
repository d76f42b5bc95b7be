"""Tenant migrations: each run migrates ONE tenant's schema (fastapi-tenancy picks which)."""

from logging.config import fileConfig

from alembic import context
from fastapi_tenancy.migrations import run_tenant_migrations
from sqlmodel import SQLModel

import app.models  # noqa: F401 - defines the tables of SQLModel.metadata

# Tables WITHOUT a schema are per tenant: here, all of them.
target_metadata = SQLModel.metadata

if context.config.config_file_name is not None and not context.config.attributes.get("tenancy_fleet"):
    fileConfig(context.config.config_file_name)

run_tenant_migrations(context, target_metadata)
