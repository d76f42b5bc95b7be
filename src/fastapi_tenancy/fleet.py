"""The fleet runner's names, where they were first imported from.

They live in the `migrations` package now: `FleetMigrator` in `migrations/fleet.py`,
the report types in `migrations/results.py`, and `FleetBusyError` in `errors.py`.
This module re-exports them so that `from fastapi_tenancy.fleet import FleetMigrator`
keeps working. Needs the `migrations` extra (Alembic).
"""

from .errors import FleetBusyError
from .migrations.env import FLEET_ATTRIBUTE
from .migrations.fleet import FleetMigrator
from .migrations.results import (
    SPARE_LABEL,
    TEMPLATE_LABEL,
    Direction,
    FleetReport,
    Outcome,
    TenantMigration,
    TenantResult,
)

__all__ = [
    "FLEET_ATTRIBUTE",
    "SPARE_LABEL",
    "TEMPLATE_LABEL",
    "Direction",
    "FleetBusyError",
    "FleetMigrator",
    "FleetReport",
    "Outcome",
    "TenantMigration",
    "TenantResult",
]
