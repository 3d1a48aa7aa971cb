"""The ``sessionmgr`` command: the root group (cli_app) with every group of commands registered.

One module per group of commands: cli_sessions (create, end, touch, control, adopt), cli_queries
(list, show, stats), cli_cleanup (reap, end-all, reconcile, prune), cli_serve (serve, demo,
fake-server), cli_db (db upgrade/current/check). What they share: cli_app (settings, exit codes,
errors, opening the database), cli_params (option types), cli_output (tables, JSON, CSV).
Tables are for people (they fit the terminal, 80 columns when piped, no colour unless a TTY);
``--json`` is for scripts and uses the record's field names.
"""

from __future__ import annotations

from . import cli_cleanup, cli_db, cli_queries, cli_serve, cli_sessions
from .cli_app import cli

COMMAND_MODULES = (
    cli_sessions,
    cli_queries,
    cli_cleanup,
    cli_serve,
    cli_db,
)  # registered on import
__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="sessionmgr")
