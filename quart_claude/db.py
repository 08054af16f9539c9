"""What a host app needs of quart-claude's database tables (``quart-claude[db]``).

``include_object`` goes to the host's Alembic ``context.configure(include_object=...)`` so its
autogenerate never tries to drop our tables; ``metadata`` is ours alone (never merge it into
the host's model base).
"""

from ._core.db import VERSION_TABLE, include_object, metadata

__all__ = ["VERSION_TABLE", "include_object", "metadata"]
