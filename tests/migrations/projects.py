"""An Alembic project made from the package template, with two tenant revisions (a1, b2)."""

import shutil
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "src" / "fastapi_tenancy" / "migrations" / "template"

# Two tenant revisions. The first overlaps in time across tenants (pg_sleep) and records
# the schema it ran in, so a test can see both concurrency and where each run landed;
# the second fails in any schema holding a table named `fail_here`.
REVISION_A = """
import sqlalchemy as sa
from alembic import op

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text))
    op.create_table("marks", sa.Column("schema", sa.Text), sa.Column("started", sa.DateTime(timezone=True)),
                    sa.Column("finished", sa.DateTime(timezone=True)))
    op.execute("INSERT INTO marks SELECT current_schema(), clock_timestamp(), NULL")
    op.execute("SELECT pg_sleep(SLEEP)")
    op.execute("UPDATE marks SET finished = clock_timestamp()")


def downgrade() -> None:
    op.drop_table("marks")
    op.drop_table("items")
"""

REVISION_B = """
import sqlalchemy as sa
from alembic import op

revision = "b2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "DO $$ BEGIN IF to_regclass('fail_here') IS NOT NULL THEN RAISE EXCEPTION 'boom'; END IF; END $$"
    )
    op.add_column("items", sa.Column("price", sa.Integer, server_default="0"))


def downgrade() -> None:
    op.drop_column("items", "price")
"""


def make_project(root: Path, sleep: float = 0.0) -> Path:
    """An Alembic project (the package template) with revisions a1 and b2; its alembic.ini."""
    shutil.copytree(TEMPLATE, root, dirs_exist_ok=True)
    versions = root / "migrations" / "tenant" / "versions"
    (versions / "a1.py").write_text(REVISION_A.replace("SLEEP", str(sleep)))
    (versions / "b2.py").write_text(REVISION_B)
    ini = root / "alembic.ini"
    ini.write_text(ini.read_text().replace("%(here)s", str(root)))
    return ini


def models(*, tenant_column: bool = False, note: bool = False) -> str:
    """The source of a `models.py`: two tenant tables (one referring to the other) and a shared one.

    `tenant_column`: every tenant table leads its primary key with `tenant_id` (row-level
    security, hybrid tiers). `note`: the second version of the models, `orders.note` added.
    """
    tenant = 'sa.Column("tenant_id", sa.String(36), primary_key=True), ' if tenant_column else ""
    reference = (
        'sa.ForeignKeyConstraint(["tenant_id", "customer_id"], ["customers.tenant_id", "customers.id"])'
        if tenant_column
        else 'sa.ForeignKeyConstraint(["customer_id"], ["customers.id"])'
    )
    return f"""
import sqlalchemy as sa

metadata = sa.MetaData()

customers = sa.Table(
    "customers", metadata, {tenant}
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
)
orders = sa.Table(
    "orders", metadata, {tenant}
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("customer_id", sa.Integer, nullable=False),
    sa.Column("total", sa.Numeric(10, 2)),
    {'sa.Column("note", sa.Text),' if note else ""}
    {reference},
)
# Shared: declared with its schema, so it is the shared environment's, never a tenant's.
plans = sa.Table("plans", metadata, sa.Column("id", sa.Integer, primary_key=True), schema="public")
"""


def make_models_project(root: Path, source: str) -> Path:
    """An Alembic project (the package template, no revisions) whose envs compare `models.py`."""
    shutil.copytree(TEMPLATE, root, dirs_exist_ok=True)
    (root / "models.py").write_text(source)
    for env in ("tenant", "shared"):
        path = root / "migrations" / env / "env.py"
        path.write_text(
            path.read_text().replace(
                "target_metadata = None", "from models import metadata as target_metadata"
            )
        )
    ini = root / "alembic.ini"
    ini.write_text(ini.read_text().replace("%(here)s", str(root)))
    return ini


# The same two revisions for MySQL/MariaDB, in SQL both servers speak. The second fails in a
# database holding a table named `fail_here`, before any of its DDL (which MySQL would commit).
MYSQL_REVISION_A = """
import sqlalchemy as sa
from alembic import op

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(100)))
    op.create_table("marks", sa.Column("db", sa.String(64)))
    op.execute("INSERT INTO marks SELECT DATABASE()")


def downgrade() -> None:
    op.drop_table("marks")
    op.drop_table("items")
"""

MYSQL_REVISION_B = """
import sqlalchemy as sa
from alembic import op

revision = "b2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("fail_here"):
        raise RuntimeError("boom")
    op.add_column("items", sa.Column("price", sa.Integer, server_default="0"))


def downgrade() -> None:
    op.drop_column("items", "price")
"""


def make_mysql_project(root: Path) -> Path:
    """`make_project`, with revisions a1 and b2 written for MySQL/MariaDB; its alembic.ini."""
    ini = make_project(root)
    versions = root / "migrations" / "tenant" / "versions"
    (versions / "a1.py").write_text(MYSQL_REVISION_A)
    (versions / "b2.py").write_text(MYSQL_REVISION_B)
    return ini
