"""``python -m sessionmgr`` is the ``sessionmgr`` command."""

from .cli import main

main()
