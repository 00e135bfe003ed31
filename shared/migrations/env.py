"""Alembic's entry: runs the migrations on the connection labq's upgrade() passes in."""

from alembic import context

from labq.shared.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - labq always passes its own connection
    raise RuntimeError("run migrations through labq.shared.migrations.upgrade(engine)")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
