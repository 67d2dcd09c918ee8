"""Alembic's environment for bac-node: run by :func:`bac_node.node.migrations.upgrade`.

bac-node runs its migrations itself, on the connection (and inside the transaction) that
:func:`~bac_node.node.migrations.upgrade` passes in ``config.attributes["connection"]``;
there is no ``alembic.ini`` and no URL here. Use ``bac-node db upgrade``.
"""

from __future__ import annotations

from alembic import context

from bac_node.node.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "bac-node's migrations run through bac-node: `bac-node db upgrade` "
        "(or bac_node.node.migrations.upgrade)"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: later migrations use batch operations there.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():  # the caller's transaction: nothing of its own
    context.run_migrations()
