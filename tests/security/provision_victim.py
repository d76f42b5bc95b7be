"""Run as a process of its own by test_provisioning_crash.py, to be killed mid-provisioning:
registers tenant "victim" with the test app's tables plus many more, so that provisioning
lasts long enough to be caught in the middle. Settings come from `TENANCY_*` variables."""

import asyncio

import sqlalchemy as sa

from fastapi_tenancy import TenancyConfig, TenancyManager
from tests.apps import Base

TABLES = 300


def metadata() -> sa.MetaData:
    combined = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(combined)
    for n in range(TABLES):
        sa.Table(
            f"filler_{n}", combined, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text)
        )
    return combined


async def main() -> None:
    manager = TenancyManager(TenancyConfig())
    await manager.initialize()
    try:
        await manager.register_tenant("victim", "Victim", app_metadata=metadata())
    finally:
        await manager.close()


if __name__ == "__main__":
    asyncio.run(main())
