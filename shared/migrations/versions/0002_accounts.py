"""Accounts: users, API tokens, login failures; jobs gain an owner and a fair-share hold.

The idempotency key becomes unique per owner instead of globally. Jobs made before
accounts existed belong to ``admin`` (the account labq creates on its first start).

Revision ID: 0002
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0006"
branch_labels = None
depends_on = None

# Names the baseline's unnamed UNIQUE (idempotency_key) gets: PostgreSQL names it itself;
# on SQLite batch mode needs a naming convention to find it.
_PG_OLD_UNIQUE = "jobs_idempotency_key_key"
_SQLITE_CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255)),
        sa.Column("is_admin", sa.Boolean, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("dispatch_seq", sa.Integer, nullable=False),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_index("ix_api_tokens_hash", "api_tokens", ["token_hash"], unique=True)
    op.create_index("ix_api_tokens_user", "api_tokens", ["user_id"])
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_login_failures_key_at", "login_failures", ["key", "at"])

    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(_PG_OLD_UNIQUE, "jobs", type_="unique")
        op.add_column("jobs", sa.Column("owner", sa.String(64)))
        op.add_column("jobs", sa.Column("hold_reason", sa.String(200)))
        op.create_unique_constraint("uq_jobs_owner_key", "jobs", ["owner", "idempotency_key"])
    else:
        with op.batch_alter_table("jobs", naming_convention=_SQLITE_CONVENTION) as batch:
            batch.drop_constraint("uq_jobs_idempotency_key", type_="unique")
            batch.add_column(sa.Column("owner", sa.String(64)))
            batch.add_column(sa.Column("hold_reason", sa.String(200)))
            batch.create_unique_constraint("uq_jobs_owner_key", ["owner", "idempotency_key"])
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", "created_at", "id"])
    op.create_index("ix_jobs_owner_state", "jobs", ["owner", "state"])
    op.execute("UPDATE jobs SET owner = 'admin' WHERE owner IS NULL")

