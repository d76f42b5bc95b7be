"""Tenant migrations: each run migrates ONE tenant's schema (fastapi-tenancy picks which)."""

from logging.config import fileConfig

from alembic import context

from fastapi_tenancy.migrations import run_tenant_migrations

# Your models' MetaData, for autogenerate: tables WITHOUT a schema are per tenant.
# from myapp.models import Base
# target_metadata = Base.metadata
# SQLModel: import your models' module, then `target_metadata = SQLModel.metadata`.
target_metadata = None

if context.config.config_file_name is not None and not context.config.attributes.get("tenancy_fleet"):
    fileConfig(context.config.config_file_name)

run_tenant_migrations(context, target_metadata)
