import asyncio
from main import manager, Base

async def seed():
    await manager.initialize()
    # Register a tenant (creates the schema + all Base tables inside it)
    tenant = await manager.register_tenant(
        identifier="acme-corp",
        name="Acme Corporation",
        app_metadata=Base.metadata,  # creates tables in the new schema
    )
    print(f"Created: {tenant.identifier} → schema: tenant_acme_corp")
    await manager.close()

asyncio.run(seed())
