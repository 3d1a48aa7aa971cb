"""Alembic migrations of the sessionmgr schema.

In the repository: ``migrations/`` beside ``alembic.ini``. Installed: the package
``sessionmgr.migrations`` (pyproject.toml maps the folder into the wheel), which
``sessionmgr.db.alembic_config`` points alembic at.
"""
