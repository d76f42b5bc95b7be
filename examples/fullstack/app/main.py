"""The app: users and items per tenant, OAuth2 password login issuing a JWT that names the tenant.

Run it (PostgreSQL; the README has the full walk-through):

    TENANCY_DATABASE_URL=postgresql+asyncpg://postgres@localhost/fullstack \
    TENANCY_JWT_SECRET=change-me-to-32-bytes-or-more-of-secret \
    uvicorn app.main:app
"""

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, HTTPException
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware
from fastapi_tenancy.dependencies import CurrentTenant, TokenClaims, make_tenant_db_dependency
from fastapi_tenancy.tenant import validate_identifier
from sqlalchemy.orm import selectinload
from sqlmodel import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import Item, ItemCreate, ItemPublic, ItemsPublic, ItemUpdate, Token, User, UserCreate, UserPublic
from .security import create_access_token, hash_password, verify_password

PROJECT = Path(__file__).resolve().parents[1]

# TENANCY_DATABASE_URL and TENANCY_JWT_SECRET come from the environment.
config = TenancyConfig(
    resolution_strategy="jwt",  # every tenant request carries a token naming its tenant
    jwt_algorithms=("HS256",),
    alembic_config=str(PROJECT / "alembic.ini"),  # new tenants start at the head revision
)
manager = TenancyManager(config)

app = FastAPI(title="Full-stack template, multi-tenant", lifespan=manager.create_lifespan())
# The login names its tenant in the form, not in a token it has yet to get: excluded.
app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/login", "/health"])

get_db = make_tenant_db_dependency(manager, session_class=AsyncSession)  # session.exec() works
SessionDep = Annotated[AsyncSession, Depends(get_db)]
# For the Authorize dialog of /docs; the token itself is verified by the JWT strategy.
oauth2 = OAuth2PasswordBearer(tokenUrl="/login/access-token")


async def get_current_user(
    session: SessionDep, claims: TokenClaims, _: Annotated[str, Depends(oauth2)]
) -> User:
    """The user of the token, in the token's tenant (the session sees no other)."""
    user = await session.get(User, int(claims["sub"]))
    if user is None:
        raise HTTPException(404, "User not found")
    if not user.is_active:
        raise HTTPException(400, "Inactive user")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def require_superuser(user: CurrentUser) -> User:
    if not user.is_superuser:
        raise HTTPException(403, "The user doesn't have enough privileges")
    return user


Superuser = Annotated[User, Depends(require_superuser)]


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


# -- login -------------------------------------------------------------------------------
@app.post("/login/access-token")
async def login_access_token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], tenant: Annotated[str, Form()]
) -> Token:
    """OAuth2 password login, plus the tenant the user belongs to."""
    # No tenant was resolved on this path: the route looks it up. validate_identifier
    # refuses a malformed slug before any lookup, get_tenant an unknown one (404), and
    # manager.session() one that is not active (403).
    found = await manager.get_tenant(validate_identifier(tenant))
    async with manager.session(found, session_class=AsyncSession) as session:
        user = (await session.exec(select(User).where(User.email == form.username))).first()
    if user is None or user.id is None or not verify_password(form.password, user.hashed_password):
        raise HTTPException(400, "Incorrect email or password")
    if not user.is_active:
        raise HTTPException(400, "Inactive user")
    return Token(access_token=create_access_token(manager.config, found.identifier, user.id))


# -- users -------------------------------------------------------------------------------
@app.get("/users/me")
async def read_user_me(user: CurrentUser, tenant: CurrentTenant) -> dict[str, Any]:
    return {"tenant": tenant.identifier, **UserPublic.model_validate(user).model_dump()}


@app.post("/users/")
async def create_user(body: UserCreate, session: SessionDep, _: Superuser) -> UserPublic:
    if (await session.exec(select(User).where(User.email == body.email))).first() is not None:
        raise HTTPException(400, "The user with this email already exists in the system.")
    user = User.model_validate(body, update={"hashed_password": hash_password(body.password)})
    session.add(user)
    await session.commit()
    return UserPublic.model_validate(user)


@app.get("/users/{user_id}/items")
async def read_user_items(user_id: int, session: SessionDep, _: Superuser) -> list[ItemPublic]:
    """A user's items, through the relationship (loaded with `selectinload`)."""
    statement = select(User).where(User.id == user_id).options(selectinload(User.items))  # type: ignore[arg-type]
    user = (await session.exec(statement)).first()
    if user is None:
        raise HTTPException(404, "User not found")
    return [ItemPublic.model_validate(item) for item in user.items]


# -- items -------------------------------------------------------------------------------
@app.get("/items/")
async def read_items(session: SessionDep, user: CurrentUser, skip: int = 0, limit: int = 100) -> ItemsPublic:
    """Every item for a superuser, the user's own otherwise."""
    count = select(func.count()).select_from(Item)
    items = select(Item).order_by(Item.id).offset(skip).limit(limit)  # type: ignore[arg-type]
    if not user.is_superuser:
        count, items = count.where(Item.owner_id == user.id), items.where(Item.owner_id == user.id)
    data = (await session.exec(items)).all()
    return ItemsPublic(
        data=[ItemPublic.model_validate(i) for i in data], count=(await session.exec(count)).one()
    )


async def _own_item(session: AsyncSession, user: User, item_id: int) -> Item:
    item = await session.get(Item, item_id)
    if item is None:
        raise HTTPException(404, "Item not found")
    if not user.is_superuser and item.owner_id != user.id:
        raise HTTPException(400, "Not enough permissions")
    return item


@app.get("/items/{item_id}")
async def read_item(item_id: int, session: SessionDep, user: CurrentUser) -> ItemPublic:
    return ItemPublic.model_validate(await _own_item(session, user, item_id))


@app.post("/items/")
async def create_item(body: ItemCreate, session: SessionDep, user: CurrentUser) -> ItemPublic:
    item = Item.model_validate(body, update={"owner_id": user.id})
    session.add(item)
    await session.commit()
    return ItemPublic.model_validate(item)


@app.put("/items/{item_id}")
async def update_item(item_id: int, body: ItemUpdate, session: SessionDep, user: CurrentUser) -> ItemPublic:
    item = await _own_item(session, user, item_id)
    item.sqlmodel_update(body.model_dump(exclude_unset=True))
    await session.commit()
    return ItemPublic.model_validate(item)


@app.delete("/items/{item_id}")
async def delete_item(item_id: int, session: SessionDep, user: CurrentUser) -> dict[str, str]:
    await session.delete(await _own_item(session, user, item_id))
    await session.commit()
    return {"message": "Item deleted successfully"}
