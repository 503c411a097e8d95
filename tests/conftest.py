"""Shared fixtures: run the scripts as a user would, on databases built in the test's own folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/saige_db.py, the fixture builder

import saige_db  # noqa: E402


def run(script: str, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a top-level script in a subprocess, the way a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """An empty database with the contract's schema; tests add the rows they need."""
    path = tmp_path / "saige.db"
    saige_db.create(path).close()
    return path


@pytest.fixture
def demo_db(tmp_path: Path) -> Path:
    """The realistic, messy demo database (both timestamp formats, orphans, NULL and broken JSON)."""
    path = tmp_path / "demo.db"
    saige_db.build_demo(path)
    return path
