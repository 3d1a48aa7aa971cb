"""`sessionmgr db upgrade`, `current` and `check`: the schema."""

from __future__ import annotations

import click

from . import db
from .cli_app import EXIT_FAILURE, CliContext, cli, fail, run

# --- db: the schema ----------------------------------------------------------------------------


@cli.group(name="db")
def db_group() -> None:
    """The database schema: upgrade it, show its revision, check it against the code."""


@db_group.command(name="upgrade")
@click.pass_obj
def db_upgrade(obj: CliContext) -> None:
    """Create the database, or migrate it to what this version needs (safe to repeat)."""
    url = obj.settings.database_url

    async def upgrade() -> str | None:
        before = await db.current(url)
        await db.upgrade(url)
        return before

    before = run(upgrade())
    head = db.head_revision()
    where = db.safe_url(url)
    if before == head:
        click.echo(f"{where} is already at revision {head}")
    else:
        click.echo(f"{where} upgraded from {before or 'an empty database'} to revision {head}")


@db_group.command(name="current")
@click.pass_obj
def db_current(obj: CliContext) -> None:
    """Show the schema revision of the database, and whether it is the one the code needs."""
    at = run(db.current(obj.settings.database_url))
    head = db.head_revision()
    if at == head:
        click.echo(f"{at} (head)")
    elif at is None:
        click.echo(f"none (not migrated: run `sessionmgr db upgrade` to reach {head})")
    else:
        click.echo(f"{at} (behind: the code needs {head}; run `sessionmgr db upgrade`)")


@db_group.command(name="check")
@click.pass_obj
def db_check(obj: CliContext) -> None:
    """Exit non-zero when the database is behind or its schema differs from the models."""
    url = obj.settings.database_url
    problems = run(db.check(url))
    if problems:
        for problem in problems[:-1]:
            click.echo(f"error: {problem}", err=True)
        fail(problems[-1], EXIT_FAILURE)
    click.echo(f"ok: {db.safe_url(url)} is at revision {db.head_revision()} and matches the models")
