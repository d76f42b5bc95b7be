"""The first superuser of a tenant: `python -m app.initial_data acme admin@example.com <password>`."""

import asyncio
import sys

from fastapi_tenancy import TenancyManager
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import User
from .security import hash_password


async def create_first_superuser(manager: TenancyManager, tenant: str, email: str, password: str) -> User:
    """The tenant's superuser `email` (made if missing), through a session scoped to `tenant`."""
    async with manager.session(tenant, session_class=AsyncSession) as session:
        user = (await session.exec(select(User).where(User.email == email))).first()
        if user is None:
            user = User(email=email, hashed_password=hash_password(password), is_superuser=True)
            session.add(user)
            await session.commit()
        return user


async def main(tenant: str, email: str, password: str) -> None:
    from .main import manager

    await manager.initialize()
    try:
        user = await create_first_superuser(manager, tenant, email, password)
        print(f"{tenant}: superuser {user.email} (id {user.id})")
    finally:
        await manager.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
