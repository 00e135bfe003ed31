"""The baseline: the jobs and events tables as labq created them before migrations.

Revision ID: 0001
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = ("created", "queued", "initialized", "started", "paused", "completed", "stopped",
          "failed")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_state", sa.String(16)),
        sa.Column("outcome", sa.String(16)),
        sa.Column("exit_code", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("worker", sa.String(200)),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("bundle_bytes", sa.BigInteger, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(200), unique=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        *(sa.Column(f"{state}_at", sa.Float) for state in STATES),
    )
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_name", "jobs", ["name"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16)),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_index("ix_events_job_id", "events", ["job_id"])
