"""Storage: the interface services use (:mod:`.contract`) and its backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from state_manager.settings import Settings
    from state_manager.store.contract import Store


def open_store(settings: Settings, *, pool_size: int = 10) -> Store:
    """The database the settings select: MongoDB when ``MONGO_URI`` is set, else the SQL
    database of ``DATABASE_URL`` (SQLite by default)."""
    if settings.mongo_uri:
        from state_manager.store.mongo import MongoStore

        return MongoStore(settings.mongo_uri, settings.mongo_database_name, pool_size=pool_size)
    from state_manager.store.database import Database

    return Database(settings.resolved_database_url, pool_size=pool_size)
