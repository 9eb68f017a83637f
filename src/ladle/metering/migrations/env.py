"""Alembic's entry point: Store.open runs `upgrade head` on its own connection (no alembic.ini)."""

from alembic import context

from ladle.metering.store import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
