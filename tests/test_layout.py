"""Layers import downward only: checked in a fresh interpreter, where nothing else is loaded yet."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    code = f"{statement}\nimport sys\nprint(','.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    return [m for m in out.split(",") if m]


SERVER_SIDE = ("aiohttp.web", "click", "prometheus_client", "sessionmgr.web", "sessionmgr.cli")


def test_import_sessionmgr_loads_no_server_side() -> None:
    assert _loaded_after("import sessionmgr", SERVER_SIDE) == []


def test_the_lazy_names_still_resolve() -> None:
    loaded = _loaded_after(
        "import sessionmgr\nassert callable(sessionmgr.create_app)\nassert sessionmgr.Metrics",
        ("aiohttp.web", "prometheus_client"),
    )
    assert loaded == ["aiohttp.web", "prometheus_client"]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("sessionmgr.web", ("click", "sessionmgr.cli_params", "sessionmgr.cli")),
        ("sessionmgr.cli_params", ("sessionmgr.testing",)),
        ("sessionmgr.parsing", ("click", "aiohttp.web")),
        ("sessionmgr.checks", ("click", "aiohttp.web")),
    ],
)
def test_layers_import_downward(module: str, forbidden: tuple[str, ...]) -> None:
    assert _loaded_after(f"import {module}", forbidden) == []


def test_reconcile_uses_only_the_reapers_public_surface() -> None:
    import ast
    import inspect

    from sessionmgr import reconcile

    tree = ast.parse(inspect.getsource(reconcile))
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "reaper"
        and node.attr.startswith("_")
    ]
    assert private == []
