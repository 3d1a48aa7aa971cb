"""Alembic migrations of the sessionmgr schema (script_location ``sessionmgr:migrations``)."""
