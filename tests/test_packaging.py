"""The migrations live at the top level yet ship in the wheel: both ways of migrating work."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "*.db*"
)


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _head() -> str:
    from sessionmgr import db

    return db._scripts().get_current_head() or ""


def test_plain_alembic_upgrade_head_from_the_repository_root(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert {"sessions", "session_events", "alembic_version"} <= _tables(tmp_path / "a.db")


@pytest.mark.slow
def test_db_upgrade_after_a_plain_pip_install_from_any_directory(tmp_path: Path) -> None:
    """A wheel built from the checkout (pip's isolated build fetches setuptools from the package
    registry, nothing else), installed with --no-deps --no-index, not editable, into a fresh
    virtualenv that sees the already-installed dependencies through a .pth line."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("sessionmgr-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    db = elsewhere / "fresh.db"
    run = subprocess.run(
        [
            str(env_dir / "bin" / "sessionmgr"),
            "--database-url",
            f"sqlite+aiosqlite:///{db}",
            "db",
            "upgrade",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    where = subprocess.run(
        [str(python), "-c", "import sessionmgr.db as d; print(d.migrations_dir())"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(site), where  # the installed copy, not the checkout
    assert sorted(p.name for p in Path(where, "versions").glob("0*.py")) == sorted(
        p.name for p in (ROOT / "migrations" / "versions").glob("0*.py")
    )
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (_head(),)
