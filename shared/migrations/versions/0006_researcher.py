"""The researcher's columns: stage durations, peak memory and CPU, sweeps, reruns, webhooks.

Revision ID: 0006
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = (
    ("paused_s", sa.Float),  # seconds spent paused in pauses already resumed
    ("env_s", sa.Float),  # seconds the worker spent unpacking and preparing the environment
    ("run_s", sa.Float),  # running time (pauses excluded), set when the script ended
    ("peak_rss_mb", sa.Float),
    ("cpu_s", sa.Float),
    ("group_id", sa.String(32)),  # the sweep this job belongs to
    ("rerun_of", sa.String(32)),  # the job this one re-runs (same bundle and lock)
    ("notify_url", sa.Text),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind))
        batch.create_index("ix_jobs_group", ["group_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_group")
        for name, _kind in reversed(COLUMNS):
            batch.drop_column(name)
