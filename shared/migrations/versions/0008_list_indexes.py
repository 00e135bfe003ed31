"""Indexes for job lists over a long history: every filter the API offers reads its page
in sort order through an index (state, owner and state, outcome; run time for duration
sorts; stop time for the recent-runs median), none sorts the table.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: (name, columns) added; the two they replace are prefixes of the first two.
NEW = (
    ("ix_jobs_state_created", ["state", "created_at", "id"]),
    ("ix_jobs_owner_state_created", ["owner", "state", "created_at", "id"]),
    ("ix_jobs_outcome_created", ["outcome", "created_at", "id"]),
    ("ix_jobs_outcome_run", ["outcome", "run_s", "id"]),
    ("ix_jobs_run", ["run_s", "id"]),
    ("ix_jobs_stopped", ["stopped_at"]),
)
REPLACED = (("ix_jobs_state", ["state"]), ("ix_jobs_owner_state", ["owner", "state"]))


def upgrade() -> None:
    for name, columns in NEW:
        op.create_index(name, "jobs", columns)
    for name, _columns in REPLACED:
        op.drop_index(name, table_name="jobs")


def downgrade() -> None:
    for name, columns in REPLACED:
        op.create_index(name, "jobs", columns)
    for name, _columns in NEW:
        op.drop_index(name, table_name="jobs")
